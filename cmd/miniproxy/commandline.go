package main

import (
	"errors"
	"fmt"
	"io"

	"github.com/spf13/pflag"
)

// newFlagSet is the command line: kube-proxy's flags and miniproxy's own.
func newFlagSet(opts *options) *pflag.FlagSet {
	fs := pflag.NewFlagSet("miniproxy", pflag.ContinueOnError)
	fs.SortFlags = true
	// Errors are returned once, by main, with the flag's name.
	fs.SetOutput(io.Discard)
	opts.register(fs)
	return fs
}

// parseCommandLine reads args into opts. --help and --version write to
// out and set opts.done; a flag error or a stray argument is one error
// naming it.
func parseCommandLine(fs *pflag.FlagSet, opts *options, args []string, out io.Writer) error {
	switch err := fs.Parse(args); {
	case errors.Is(err, pflag.ErrHelp):
		fmt.Fprintf(out, "miniproxy replaces kube-proxy's iptables mode; it takes kube-proxy's flags (docs/compatibility.md).\n\nUsage:\n  miniproxy [flags]\n\nFlags:\n%s", fs.FlagUsagesWrapped(0))
		opts.done = true
		return nil
	case err != nil:
		return fmt.Errorf("%w: %v", errUsage, err)
	case fs.NArg() > 0:
		return fmt.Errorf("%w: unexpected argument %q: miniproxy takes flags only", errUsage, fs.Arg(0))
	}
	if opts.version != "false" {
		fmt.Fprintln(out, versionText(opts.version == "raw"))
		opts.done = true
	}
	return nil
}

// commandLine reads args into the effective configuration and checks it,
// as kube-proxy's Complete and Validate; opts.done says --help or
// --version was answered on out. notes are warnings to log.
func commandLine(args []string, out io.Writer) (opts *options, notes []string, err error) {
	opts = &options{}
	fs := newFlagSet(opts)
	if err := parseCommandLine(fs, opts, args, out); err != nil || opts.done {
		return opts, nil, err
	}
	if notes, err = opts.complete(fs); err != nil {
		return opts, nil, err
	}
	return opts, notes, opts.validate()
}
