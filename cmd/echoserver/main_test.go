package main

import (
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"net/url"
	"strings"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
)

func TestEchoFormat(t *testing.T) {
	srv := httptest.NewServer(newEchoHandler("pod-a"))
	defer srv.Close()
	host := strings.TrimPrefix(srv.URL, "http://")

	req, err := http.NewRequest("GET", srv.URL+"/some/path?x=1&y=2", nil)
	if err != nil {
		t.Fatal(err)
	}
	req.Header.Set("User-Agent", "curl/8.0")
	req.Header.Set("Accept", "*/*")
	req.Header.Add("X-Multi", "a")
	req.Header.Add("X-Multi", "b")
	resp, err := srv.Client().Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	body, _ := io.ReadAll(resp.Body)
	if resp.StatusCode != 200 {
		t.Fatalf("status %d", resp.StatusCode)
	}
	if ct := resp.Header.Get("Content-Type"); ct != "text/plain" {
		t.Errorf("Content-Type = %q, want text/plain", ct)
	}
	want := `CLIENT VALUES:
client_address=127.0.0.1
command=GET
real path=/some/path
query=x=1&y=2
request_version=1.1
request_uri=http://` + host + `/some/path?x=1&y=2

SERVER VALUES:
server_version=miniproxy-echoserver
hostname=pod-a

HEADERS RECEIVED:
accept=*/*
accept-encoding=gzip
host=` + host + `
user-agent=curl/8.0
x-multi=a, b
BODY:
-no body in request-
`
	if diff := cmp.Diff(want, string(body)); diff != "" {
		t.Errorf("reply mismatch (-want +got):\n%s", diff)
	}
}

func TestEchoNoQueryNoNameWithBody(t *testing.T) {
	r := httptest.NewRequest("POST", "http://svc.example/", strings.NewReader("hello"))
	r.RemoteAddr = "[fd00::5]:4242"
	got := formatEcho(r, "", []byte("hello"))
	for _, line := range []string{
		"client_address=fd00::5\n",
		"command=POST\n",
		"real path=/\n",
		"query=nil\n",
		"request_uri=http://svc.example/\n",
		"host=svc.example\n",
		"BODY:\nhello",
	} {
		if !strings.Contains(got, line) {
			t.Errorf("reply lacks %q:\n%s", line, got)
		}
	}
	if strings.Contains(got, "hostname=") {
		t.Errorf("hostname= printed without -name:\n%s", got)
	}
}

// TestProxyAppendsXFF checks the ingress mode: the app behind the proxy sees
// the proxy as client_address and the original client (and any earlier
// hops) in X-Forwarded-For.
func TestProxyAppendsXFF(t *testing.T) {
	app := httptest.NewServer(newEchoHandler("app"))
	defer app.Close()
	target, _ := url.Parse(app.URL)
	ingress := httptest.NewServer(newProxy(target))
	defer ingress.Close()

	for _, tc := range []struct {
		name    string
		inbound string
		want    string
	}{
		{"no header", "", "x-forwarded-for=127.0.0.1\n"},
		{"existing header", "198.51.100.79", "x-forwarded-for=198.51.100.79, 127.0.0.1\n"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			req, _ := http.NewRequest("GET", ingress.URL+"/p", nil)
			req.Host = "shop.example"
			if tc.inbound != "" {
				req.Header.Set("X-Forwarded-For", tc.inbound)
			}
			resp, err := http.DefaultClient.Do(req)
			if err != nil {
				t.Fatal(err)
			}
			body, _ := io.ReadAll(resp.Body)
			resp.Body.Close()
			got := string(body)
			for _, line := range []string{tc.want, "client_address=127.0.0.1\n", "host=shop.example\n", "hostname=app\n", "real path=/p\n"} {
				if !strings.Contains(got, line) {
					t.Errorf("reply lacks %q:\n%s", line, got)
				}
			}
		})
	}
}

func TestUDP(t *testing.T) {
	pc, err := net.ListenPacket("udp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { done <- serveUDP(pc, "pod-u") }()

	c, err := net.Dial("udp", pc.LocalAddr().String())
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(5 * time.Second))
	if _, err := c.Write([]byte("ping")); err != nil {
		t.Fatal(err)
	}
	buf := make([]byte, 512)
	n, err := c.Read(buf)
	if err != nil {
		t.Fatal(err)
	}
	if got, want := string(buf[:n]), "client_address=127.0.0.1\nserver=pod-u\n"; got != want {
		t.Errorf("udp reply = %q, want %q", got, want)
	}
	pc.Close()
	if err := <-done; err != nil {
		t.Errorf("serveUDP after close: %v", err)
	}
}
