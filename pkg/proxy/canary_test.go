package proxy

import (
	"bytes"
	"context"
	"log/slog"
	"sort"
	"strings"
	"sync"
	"testing"
	"time"

	v1 "k8s.io/api/core/v1"

	"github.com/miniproxy/miniproxy/pkg/dataplane"
	"github.com/miniproxy/miniproxy/pkg/iptables"
)

// syncBuffer is a log destination safe for the loop's goroutine and the test.
type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

// runLab starts the loop of a lab whose log goes to the returned buffer and
// returns the channel of its sync results, after the initial sync.
func runLab(t *testing.T, l *lab) (*syncBuffer, chan SyncResult) {
	t.Helper()
	logs := &syncBuffer{}
	l.proxier.log = slog.New(slog.NewTextHandler(logs, nil))
	synced := make(chan SyncResult, 64)
	l.proxier.OnSync(func(r SyncResult) { synced <- r })
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { defer close(done); l.proxier.Run(ctx) }()
	t.Cleanup(func() { cancel(); <-done })
	select {
	case r := <-synced:
		if r.Err != nil {
			t.Fatalf("initial sync: %v", r.Err)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("no initial sync")
	}
	return logs, synced
}

// natText is every chain of the fake's nat table, sorted by name.
func natText(f *dataplane.Fake) string {
	nat := f.State(iptables.IPv4)["nat"]
	names := make([]string, 0, len(nat))
	for n := range nat {
		names = append(names, n)
	}
	sort.Strings(names)
	var b strings.Builder
	for _, n := range names {
		b.WriteString(":" + n + "\n" + iptables.ChainText(nat[n]))
	}
	return b.String()
}

func TestCanaryCheckBetweenSyncsRewritesFlushedRules(t *testing.T) {
	for _, tc := range []struct {
		name  string
		flush func(s iptables.State)
		want  string
	}{
		{
			name: "iptables -t nat -F",
			flush: func(s iptables.State) {
				for _, c := range s["nat"] {
					c.Rules = nil
				}
			},
			want: "the canary chain MP-CANARY of table nat was emptied: another program flushed miniproxy's rules; rewriting all of them",
		},
		{
			name: "every table emptied and every chain deleted (nft flush ruleset)",
			flush: func(s iptables.State) {
				for k := range s {
					delete(s, k)
				}
				for k, v := range iptables.NewState() {
					s[k] = v
				}
			},
			want: "the canary chain MP-CANARY of table nat is gone: another program flushed miniproxy's rules; rewriting all of them",
		},
	} {
		t.Run(tc.name, func(t *testing.T) {
			// A sync period far longer than the test: only the canary
			// check can bring the rules back.
			l := newLab(t, Options{SyncPeriod: time.Hour, MinSyncPeriod: 10 * time.Millisecond, CanaryInterval: 50 * time.Millisecond})
			l.tracker.OnServiceAdd(service("web", "10.0.0.10", v1.ProtocolTCP))
			l.tracker.OnEndpointSliceAdd(slice("web", "10.244.2.6", "node2", v1.ProtocolTCP))
			logs, synced := runLab(t, l) // the initial sync carries the Service
			want := natText(l.fake)
			if !strings.Contains(want, "--to-destination 10.244.2.6:8080") {
				t.Fatalf("the initial sync did not program the Service: nat holds\n%s", want)
			}

			// Quiet: the checks run, nothing is written.
			inputs := len(l.fake.Inputs())
			time.Sleep(300 * time.Millisecond)
			if n := len(l.fake.Inputs()) - inputs; n != 0 {
				t.Fatalf("%d restores while nothing changed", n)
			}
			checks := 0
			for _, c := range l.fake.Calls() {
				if strings.HasPrefix(c, "exists IPv4 nat MP-CANARY ") {
					checks++
				}
			}
			if checks < 3 {
				t.Errorf("%d canary checks in 300 ms at a 50 ms interval", checks)
			}

			for len(synced) > 0 { // the kick of the Service's events
				if r := <-synced; r.Err != nil || r.Results[0].Full {
					t.Fatalf("a sync before the flush: %+v", r)
				}
			}
			s := l.fake.State(iptables.IPv4)
			tc.flush(s)
			l.fake.SetState(iptables.IPv4, s)
			flushed := time.Now()
			select {
			case r := <-synced:
				if r.Err != nil || len(r.Results) != 1 || r.Results[0].Reason != dataplane.ReasonCanary {
					t.Fatalf("the sync after the flush: %+v; want a full apply for the canary", r)
				}
				t.Logf("rules rewritten %s after the flush", time.Since(flushed).Round(time.Millisecond))
			case <-time.After(5 * time.Second):
				t.Fatal("the flush went unnoticed for 5 s")
			}
			if got := natText(l.fake); got != want {
				t.Errorf("nat after the rewrite:\n%s\nwant:\n%s", got, want)
			}
			if !strings.Contains(logs.String(), `level=WARN msg="`+tc.want+`" family=IPv4`) {
				t.Errorf("no warning %q in the log:\n%s", tc.want, logs)
			}
		})
	}
}

func TestCanaryCheckCanBeTurnedOff(t *testing.T) {
	l := newLab(t, Options{SyncPeriod: time.Hour, CanaryInterval: -1})
	runLab(t, l)
	time.Sleep(100 * time.Millisecond)
	for _, c := range l.fake.Calls() {
		if strings.HasPrefix(c, "exists ") {
			t.Errorf("canary checked with the check turned off: %q", c)
		}
	}
}

func TestRetryAfterAFailedSync(t *testing.T) {
	for _, tc := range []struct {
		name      string
		opts      Options
		took      time.Duration
		wantWaits []time.Duration
	}{
		{
			name:      "defaults: doubles from 1 s, at most 10 s although the sync period is 30 s",
			opts:      Options{SyncPeriod: 30 * time.Second, MinSyncPeriod: time.Second},
			took:      50 * time.Millisecond,
			wantWaits: []time.Duration{1, 2, 4, 8, 10, 10},
		},
		{
			name:      "a short sync period bounds it first",
			opts:      Options{SyncPeriod: 5 * time.Second},
			took:      50 * time.Millisecond,
			wantWaits: []time.Duration{1, 2, 4, 5, 5},
		},
		{
			name:      "starts at the min sync period",
			opts:      Options{SyncPeriod: 30 * time.Second, MinSyncPeriod: 3 * time.Second},
			wantWaits: []time.Duration{3, 6, 10, 10},
		},
		{
			name:      "a sync that takes 4 s to fail waits 8 s at least",
			opts:      Options{SyncPeriod: 30 * time.Second, MinSyncPeriod: time.Second},
			took:      4 * time.Second,
			wantWaits: []time.Duration{8, 8, 8, 8, 10},
		},
		{
			name:      "a sync that takes 20 s to fail waits one sync period",
			opts:      Options{SyncPeriod: 30 * time.Second, MinSyncPeriod: time.Second},
			took:      20 * time.Second,
			wantWaits: []time.Duration{30, 30},
		},
	} {
		t.Run(tc.name, func(t *testing.T) {
			p := &Proxier{opts: tc.opts}
			var backoff time.Duration
			for i, w := range tc.wantWaits {
				var wait time.Duration
				backoff, wait = p.retryAfter(backoff, tc.took)
				if wait != w*time.Second {
					t.Errorf("retry %d: wait %s, want %s", i+1, wait, w*time.Second)
				}
			}
		})
	}
}
