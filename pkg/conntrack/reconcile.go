package conntrack

import (
	"context"
	"log/slog"
	"time"

	"github.com/miniproxy/miniproxy/pkg/iptables"
)

// Table is the kernel's conntrack table as the reconciler uses it.
type Table interface {
	// Sweep passes every entry of the family whose protocol is one of
	// protos (ProtoTCP, ProtoUDP, ProtoSCTP; TCP entries only while
	// unreplied, the only TCP entries ever judged stale) to stale, one at a time, and deletes each entry for which stale returns true before it
	// reads much further. The *Entry is only valid during the call. Sweep
	// says how many entries it passed and how many it deleted (an entry
	// gone before its deletion is not counted, and is no error); on an
	// error the counts say what was done before it.
	Sweep(fam iptables.Family, protos []uint8, stale func(*Entry) bool) (seen, deleted int, err error)
}

// Result is one family's reconciliation.
type Result struct {
	Family iptables.Family
	// Seen counts the entries read (of the protocols that have Services),
	// Deleted those deleted.
	Seen, Deleted int
	Duration      time.Duration
	Err           error
}

// Reconcile deletes the family's entries that f judges stale. Each
// deletion is logged at debug level (-v 4).
func Reconcile(t Table, fam iptables.Family, f *Frontends, log *slog.Logger) Result {
	start := time.Now()
	protos := f.Protocols()
	if len(protos) == 0 {
		return Result{Family: fam, Duration: time.Since(start)}
	}
	debug := log.Enabled(context.Background(), slog.LevelDebug)
	seen, deleted, err := t.Sweep(fam, protos, func(e *Entry) bool {
		v := f.Judge(e)
		if v.Stale && debug {
			log.Debug("deleting stale conntrack entry", "family", fam.String(), "proto", protoName(e.Proto),
				"origSrc", e.OrigSrc.String(), "origDst", e.OrigDst.String(), "replySrc", e.ReplySrc.String(),
				"servicePort", v.Service.String(), "reason", v.Reason)
		}
		return v.Stale
	})
	return Result{Family: fam, Seen: seen, Deleted: deleted, Duration: time.Since(start), Err: err}
}

func protoName(p uint8) string {
	switch p {
	case ProtoUDP:
		return "udp"
	case ProtoSCTP:
		return "sctp"
	case ProtoTCP:
		return "tcp"
	}
	return "other"
}
