package dataplane

import (
	"errors"
	"fmt"
	"slices"
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
func Cleanup(r Runner, prefix string, families ...iptables.Family) error {
	if err := checkPrefix(prefix); err != nil {
		return fmt.Errorf("cleanup: %w", err)
	}
	if len(families) == 0 {
		families = []iptables.Family{iptables.IPv4, iptables.IPv6}
	}
	var errs []error
	for _, family := range families {
		if err := cleanupFamily(r, prefix, family); err != nil {
			errs = append(errs, fmt.Errorf("clean up %s rules: %w", family, err))
		}
	}
	return errors.Join(errs...)
}

func cleanupFamily(r Runner, prefix string, family iptables.Family) error {
	owns := func(chain string) bool { return strings.HasPrefix(chain, prefix) }
	out, err := r.Save(family, "")
	if err != nil {
		return fmt.Errorf("list rules: %w", err)
	}
	saved := parseSave(string(out))
	var errs []error
	ours := map[string][]string{}
	for _, t := range sortedTables(saved) {
		st := saved[t]
		for _, c := range st.chains {
			if owns(c) {
				ours[t] = append(ours[t], c)
				continue
			}
			for _, rule := range st.rules[c] {
				if !owns(rule.Target()) {
					continue
				}
				if err := r.DeleteRule(family, t, c, rule); err != nil {
					errs = append(errs, fmt.Errorf("delete rule %q from %s %s: %w", rule.String(), t, c, err))
				}
			}
		}
	}
	if len(ours) == 0 {
		return errors.Join(errs...)
	}
	none := func(string, string) bool { return false }
	all := iptables.RenderRestore(&iptables.Ruleset{}, none, ours)
	if err := r.Restore(family, []byte(all)); err == nil {
		return errors.Join(errs...)
	}
	// One chain we cannot delete must not keep the others: flush all of
	// them (so that they no longer refer to each other), then delete them
	// one by one.
	for _, t := range sortedTables(saved) {
		if len(ours[t]) == 0 {
			continue
		}
		var flush strings.Builder
		fmt.Fprintf(&flush, "*%s\n", t)
		for _, c := range ours[t] {
			fmt.Fprintf(&flush, ":%s - [0:0]\n", c)
		}
		flush.WriteString("COMMIT\n")
		if err := r.Restore(family, []byte(flush.String())); err != nil {
			errs = append(errs, fmt.Errorf("flush chains in %s: %w", t, err))
		}
		for _, c := range slices.Sorted(slices.Values(ours[t])) {
			input := fmt.Sprintf("*%s\n-X %s\nCOMMIT\n", t, c)
			if err := r.Restore(family, []byte(input)); err != nil {
				errs = append(errs, fmt.Errorf("delete chain %s %s: %w", t, c, err))
			}
		}
	}
	return errors.Join(errs...)
}
