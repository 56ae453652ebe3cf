// Command tandem is Tandem's one binary: it runs guests, migrates them,
// protects them with a secondary and a witness, and inspects streams. See
// docs/OPERATIONS.md; `tandem help` lists the subcommands.
//
// It parses flags, builds configurations, calls package ft (the
// fault-tolerance driver and the guest node, which own every goroutine of
// a node) and prints; drill and demo run processes of it.
package main

import (
	"flag"
	"os"

	"github.com/tandemvm/tandem/internal/cli"
	"github.com/tandemvm/tandem/internal/trust"
	"github.com/tandemvm/tandem/internal/version"
)

// app is tandem's commands (each file registers its own): a usage error,
// or a plaintext non-loopback listen without --insecure, is one line on
// stderr and exit 2.
var app = &cli.App{
	Name:    "tandem",
	Version: version.Build,
	// The usage lines of commands that take more than flags (the others'
	// is "usage: tandem NAME [flags]").
	Synopses: map[string]string{
		"analyze":     "usage: tandem analyze [flags] FILE|-   (flags may follow FILE: tandem analyze FILE --json)",
		"certs ca":    "usage: tandem certs ca [flags]",
		"certs issue": "usage: tandem certs issue [flags]",
	},
	// The usage of commands made of subcommands (their -h).
	SubSynopses: map[string]string{
		"certs":  "usage: tandem certs ca --dir DIR [flags] | tandem certs issue --dir DIR --name NAME [--ip IP,...] [--dns NAME,...]\n  (tandem certs ca -h, tandem certs issue -h: their flags)",
		"schema": "usage: tandem schema dump | tandem schema check OLD.json NEW.json",
	},
	UsageErrs: []error{trust.ErrPlaintext},
}

func main() { os.Exit(app.Main(os.Args[1:], os.Stdout, os.Stderr)) }

func register(name, summary string, run func(args []string) error) { app.Register(name, summary, run) }

// usageError is a bad command line: one line, exit 2.
type usageError = cli.UsageError

func usagef(format string, a ...any) error { return cli.Usagef(format, a...) }

// newFlagSet makes a flag set for parseFlags.
func newFlagSet(name string) *flag.FlagSet { return cli.NewFlagSet(name) }

// parseFlags parses a command's flags (cli.App.Parse): errors are one
// line, exit 2; flags may follow positional arguments, of which at most
// positional are taken; -h prints the synopsis and the flags on stdout.
func parseFlags(fs *flag.FlagSet, args []string, positional int) error {
	return app.Parse(fs, args, positional)
}
