// Command tandem is Tandem's one binary: it runs guests, migrates them,
// protects them with a secondary and a witness, and inspects streams. See
// DESIGN.md's command-line section; `tandem help` lists the subcommands.
//
// It parses flags, builds configurations, calls package ft (the
// fault-tolerance driver and the guest node, which own every goroutine of
// a node) and prints; drill and demo run processes of it.
package main

import (
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"sort"

	"github.com/tandemvm/tandem/internal/trust"
)

// usageError is a bad command line: printed as one line, exit code 2.
type usageError struct{ msg string }

func (e usageError) Error() string { return e.msg }

func usagef(format string, a ...any) error { return usageError{fmt.Sprintf(format, a...)} }

type command struct {
	summary string
	run     func(args []string) error
}

var commands = map[string]command{}

func register(name, summary string, run func(args []string) error) {
	commands[name] = command{summary, run}
}

func main() {
	os.Exit(runMain(os.Args[1:], os.Stderr))
}

func runMain(args []string, stderr io.Writer) int {
	if len(args) == 0 || args[0] == "help" || args[0] == "-h" || args[0] == "--help" {
		printUsage(stderr)
		if len(args) == 0 {
			return 2
		}
		return 0
	}
	cmd, ok := commands[args[0]]
	if !ok {
		fmt.Fprintf(stderr, "tandem: unknown command %q; run 'tandem help' for the list\n", args[0])
		return 2
	}
	err := cmd.run(args[1:])
	if err == nil {
		return 0
	}
	if errors.Is(err, flag.ErrHelp) {
		return 0
	}
	var ue usageError
	if errors.As(err, &ue) || errors.Is(err, trust.ErrPlaintext) {
		fmt.Fprintf(stderr, "tandem %s: %v\n", args[0], err)
		return 2
	}
	fmt.Fprintf(stderr, "tandem %s: %v\n", args[0], err)
	return 1
}

func printUsage(w io.Writer) {
	fmt.Fprintln(w, "usage: tandem COMMAND [flags]")
	names := make([]string, 0, len(commands))
	for n := range commands {
		names = append(names, n)
	}
	sort.Strings(names)
	for _, n := range names {
		fmt.Fprintf(w, "  %-10s %s\n", n, commands[n].summary)
	}
}

// newFlagSet makes a flag set whose parse errors come back as usageErrors
// (one line, exit 2) rather than printing the whole usage.
func newFlagSet(name string) *flag.FlagSet {
	fs := flag.NewFlagSet(name, flag.ContinueOnError)
	fs.SetOutput(io.Discard)
	return fs
}

// parseFlags parses args and turns the flag package's errors into one-line
// usage errors; stray positional arguments are refused.
func parseFlags(fs *flag.FlagSet, args []string, positional int) error {
	if err := fs.Parse(args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			fs.SetOutput(os.Stderr)
			fs.PrintDefaults()
			return err
		}
		return usagef("%v", err)
	}
	if fs.NArg() > positional {
		return usagef("unexpected argument %q", fs.Arg(positional))
	}
	return nil
}
