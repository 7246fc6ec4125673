package healthcheck

import (
	"context"
	"net"
	"net/http"
	"strings"
	"testing"
	"time"
)

func TestServeAnswersUntilTheContextEnds(t *testing.T) {
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	h := http.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) { w.Write([]byte("hi")) })
	addr, err := Serve(ctx, "test", "127.0.0.1:0", h, nil)
	if err != nil {
		t.Fatal(err)
	}
	if got := fetch(t, "GET", "http://"+addr.String()+"/"); got.code != 200 || got.body != "hi" {
		t.Fatalf("got %d %q", got.code, got.body)
	}
	cancel()
	deadline := time.Now().Add(5 * time.Second)
	for fetch(t, "GET", "http://"+addr.String()+"/").code != -1 {
		if time.Now().After(deadline) {
			t.Fatal("still serving after the context ended")
		}
		time.Sleep(10 * time.Millisecond)
	}
}

func TestServeReportsATakenPortAtOnce(t *testing.T) {
	squatter, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer squatter.Close()
	_, err = Serve(context.Background(), "healthz", squatter.Addr().String(), http.NotFoundHandler(), nil)
	if err == nil || !strings.Contains(err.Error(), "start healthz server on 127.0.0.1:") || !strings.Contains(err.Error(), "address already in use") {
		t.Errorf("got %v", err)
	}
}

func TestKeepServingRetriesATakenPort(t *testing.T) {
	squatter, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := squatter.Addr().String()
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	h := http.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) { w.Write([]byte("mine")) })
	KeepServing(ctx, "metrics", addr, h, 20*time.Millisecond, nil)
	squatter.Close()
	deadline := time.Now().Add(5 * time.Second)
	for {
		if got := fetch(t, "GET", "http://"+addr+"/"); got.code == 200 && got.body == "mine" {
			return
		}
		if time.Now().After(deadline) {
			t.Fatal("the port was never taken over after it was freed")
		}
		time.Sleep(10 * time.Millisecond)
	}
}
