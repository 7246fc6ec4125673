package conntrack

import (
	"slices"
	"sync"

	"github.com/miniproxy/miniproxy/pkg/iptables"
)

// Fake is a Table in memory with the kernel's semantics: Sweep passes only
// the entries of the family and protocols asked for (TCP ones only while
// unreplied), in insertion order,
// and deletes those judged stale; other entries are kept and never shown.
type Fake struct {
	mu      sync.Mutex
	entries []Entry
	// Err, when set, is returned by the next Sweep after it has passed
	// FailAfter entries (0: before any).
	Err       error
	FailAfter int
	// Sweeps counts the calls of Sweep, per family.
	Sweeps map[iptables.Family]int
}

// Add puts entries into the table.
func (f *Fake) Add(es ...Entry) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.entries = append(f.entries, es...)
}

// Entries returns what the table holds now.
func (f *Fake) Entries() []Entry {
	f.mu.Lock()
	defer f.mu.Unlock()
	return append([]Entry(nil), f.entries...)
}

// Sweep implements Table.
func (f *Fake) Sweep(fam iptables.Family, protos []uint8, stale func(*Entry) bool) (seen, deleted int, err error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.Sweeps == nil {
		f.Sweeps = map[iptables.Family]int{}
	}
	f.Sweeps[fam]++
	keep := f.entries[:0:0]
	for i, e := range f.entries {
		if err != nil || !slices.Contains(protos, e.Proto) || e.OrigDst.Addr().Unmap().Is4() != (fam == iptables.IPv4) || (e.Proto == ProtoTCP && e.Replied) {
			keep = append(keep, e)
			continue
		}
		if f.Err != nil && seen == f.FailAfter {
			err = f.Err
			f.Err = nil
			keep = append(keep, f.entries[i])
			continue
		}
		seen++
		c := e
		if stale(&c) {
			deleted++
			continue
		}
		keep = append(keep, e)
	}
	f.entries = keep
	return seen, deleted, err
}
