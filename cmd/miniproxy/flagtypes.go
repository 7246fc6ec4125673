package main

import (
	"fmt"
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

// level is -v: klog's verbosity type.
type level struct{ v *int }

func (l *level) String() string { return strconv.Itoa(*l.v) }

func (l *level) Set(s string) error {
	n, err := strconv.Atoi(s)
	if err != nil || n < 0 {
		return fmt.Errorf("%q is not a verbosity level", s)
	}
	*l.v = n
	return nil
}

func (l *level) Type() string { return "Level" }

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
