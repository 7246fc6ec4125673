package dataplane

import (
	"errors"
	"fmt"
	"strings"

	"github.com/miniproxy/miniproxy/pkg/iptables"
)

// Cleanup removes everything a Dataplane with this prefix may have added,
// for `miniproxy --cleanup` and for tests: in every table iptables-save
// shows (mangle, nat and filter among them), first every rule in a chain
// without the prefix that jumps to a chain with it, then every chain with
// the prefix (flushed, then deleted). Nothing else is touched. With no
// families given it cleans IPv4 and IPv6.
//
// It is safe to run when nothing is installed. It keeps going after a
// failure and returns all failures joined, each with its context. Chains are
// deleted with one restore per family; if that is refused (say, because a
// chain it cannot see the reason for is still referenced), it retries chain
// by chain so that everything deletable is deleted.
func Cleanup(r Runner, prefix string, families ...iptables.Family) (Removed, error) {
	if err := checkPrefix(prefix); err != nil {
		return nil, fmt.Errorf("cleanup: %w", err)
	}
	if len(families) == 0 {
		families = []iptables.Family{iptables.IPv4, iptables.IPv6}
	}
	var errs []error
	var removed Removed
	for _, family := range families {
		rm, err := cleanupOwned(r, family, func(chain string) bool { return strings.HasPrefix(chain, prefix) })
		removed = append(removed, rm...)
		if err != nil {
			errs = append(errs, fmt.Errorf("clean up %s rules: %w", family, err))
		}
	}
	return removed, errors.Join(errs...)
}
