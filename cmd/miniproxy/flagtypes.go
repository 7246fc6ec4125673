package main

import (
	"fmt"
	"net/netip"
	"sort"
	"strconv"
	"strings"
)

// Flag value types that print the type names kube-proxy's --help prints,
// so that its flags read the same in miniproxy's help and a test can hold
// the two lists side by side.

// namedString is a string flag whose type has kube-proxy's name ("ip",
// "ipport", "LocalMode", "ProxyMode", "quantity", "pattern=N,...").
type namedString struct {
	val      *string
	typ      string
	validate func(string) error
}

func (s *namedString) String() string {
	if s.val == nil {
		return ""
	}
	return *s.val
}

func (s *namedString) Set(v string) error {
	if s.validate != nil {
		if err := s.validate(v); err != nil {
			return err
		}
	}
	*s.val = v
	return nil
}

func (s *namedString) Type() string { return s.typ }

// mapStringBool is --feature-gates: comma-separated key=bool pairs, as
// kube-proxy's cliflag.MapStringBool reads them.
type mapStringBool struct{ m *map[string]bool }

func (f *mapStringBool) String() string {
	if f.m == nil || *f.m == nil {
		return ""
	}
	var pairs []string
	for k, v := range *f.m {
		pairs = append(pairs, fmt.Sprintf("%s=%t", k, v))
	}
	sort.Strings(pairs)
	return strings.Join(pairs, ",")
}

func (f *mapStringBool) Set(v string) error {
	if *f.m == nil {
		*f.m = map[string]bool{}
	}
	for _, pair := range strings.Split(v, ",") {
		if pair = strings.TrimSpace(pair); pair == "" {
			continue
		}
		k, val, ok := strings.Cut(pair, "=")
		if !ok {
			return fmt.Errorf("missing bool value for %s", k)
		}
		b, err := strconv.ParseBool(strings.TrimSpace(val))
		if err != nil {
			return fmt.Errorf("invalid value of %s=%s, err: %v", k, val, err)
		}
		(*f.m)[strings.TrimSpace(k)] = b
	}
	return nil
}

func (f *mapStringBool) Type() string { return "mapStringBool" }

// versionFlag is --version: "true" prints the version, "raw" the build
// details, as kube-proxy's version flag.
type versionFlag struct{ v *string }

func (f *versionFlag) String() string { return *f.v }

func (f *versionFlag) Set(s string) error {
	switch s {
	case "true", "raw", "false":
		*f.v = s
		return nil
	}
	return fmt.Errorf("invalid value %q: want true, false or raw", s)
}

func (f *versionFlag) Type() string { return "version" }

// ipValue is --bind-address: an IP address ("ip" in kube-proxy's help).
type ipValue struct{ p *netip.Addr }

func (v *ipValue) String() string {
	if v.p == nil || !v.p.IsValid() {
		return ""
	}
	return v.p.String()
}

func (v *ipValue) Set(s string) error {
	a, err := netip.ParseAddr(strings.TrimSpace(s))
	if err != nil {
		return fmt.Errorf("%q is not a valid IP address", s)
	}
	*v.p = a.Unmap()
	return nil
}

func (v *ipValue) Type() string { return "ip" }
