// Command tandem is Tandem's one binary: it runs guests, migrates them,
// protects them with a secondary and a witness, and inspects streams. See
// docs/OPERATIONS.md; `tandem help` lists the subcommands.
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
	"github.com/tandemvm/tandem/internal/version"
)

// usageError is a bad command line: printed as one line, exit code 2.
type usageError struct{ msg string }

func (e usageError) Error() string { return e.msg }

func usagef(format string, a ...any) error { return usageError{fmt.Sprintf(format, a...)} }

type command struct {
	summary string
	run     func(args []string) error
}

// synopses are the usage lines of commands that take more than flags
// (the others' is "usage: tandem NAME [flags]").
var synopses = map[string]string{
	"analyze":     "usage: tandem analyze [flags] FILE|-   (flags may follow FILE: tandem analyze FILE --json)",
	"certs ca":    "usage: tandem certs ca [flags]",
	"certs issue": "usage: tandem certs issue [flags]",
}

// subSynopses are the usage of commands made of subcommands (their -h).
var subSynopses = map[string]string{
	"certs":  "usage: tandem certs ca --dir DIR [flags] | tandem certs issue --dir DIR --name NAME [--ip IP,...] [--dns NAME,...]\n  (tandem certs ca -h, tandem certs issue -h: their flags)",
	"schema": "usage: tandem schema dump | tandem schema check OLD.json NEW.json",
}

// synopsis is a command's usage line.
func synopsis(name string) string {
	if s, ok := synopses[name]; ok {
		return s
	}
	return "usage: tandem " + name + " [flags]"
}

var commands = map[string]command{}

func register(name, summary string, run func(args []string) error) {
	commands[name] = command{summary, run}
}

func main() {
	os.Exit(runMain(os.Args[1:], os.Stdout, os.Stderr))
}

// helpOut is where -h and `tandem help` print: stdout (a test swaps it).
var helpOut io.Writer = os.Stdout

func runMain(args []string, stdout, stderr io.Writer) int {
	helpOut = stdout
	if len(args) == 0 {
		printUsage(stderr) // no command: a usage error
		return 2
	}
	switch args[0] {
	case "help", "-h", "--help", "-help":
		if len(args) > 1 && args[0] == "help" {
			if _, ok := commands[args[1]]; ok {
				return runMain([]string{args[1], "-h"}, stdout, stderr)
			}
		}
		printUsage(stdout)
		return 0
	case "version", "--version", "-version":
		fmt.Fprintln(stdout, version.Build())
		return 0
	}
	cmd, ok := commands[args[0]]
	if !ok {
		fmt.Fprintf(stderr, "tandem: unknown command %q; run 'tandem help' for the list\n", args[0])
		return 2
	}
	if s, ok := subSynopses[args[0]]; ok && len(args) > 1 && (args[1] == "-h" || args[1] == "--help" || args[1] == "-help") {
		fmt.Fprintf(stdout, "%s\n  %s\n", s, cmd.summary)
		return 0
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
	fmt.Fprintln(w, "usage: tandem COMMAND [flags]   (tandem COMMAND -h: its flags; tandem version: the build)")
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
// usage errors; stray positional arguments are refused. Flags may follow
// positional arguments (tandem analyze FILE --json); after "--" every
// argument is positional. -h prints the synopsis and the flags on stdout.
func parseFlags(fs *flag.FlagSet, args []string, positional int) error {
	var pos []string
	for {
		if err := fs.Parse(args); err != nil {
			if errors.Is(err, flag.ErrHelp) {
				printHelp(fs)
				return err
			}
			return usagef("%v", err)
		}
		rest := fs.Args()
		if len(rest) == 0 {
			break
		}
		if n := len(args) - len(rest); n > 0 && args[n-1] == "--" {
			pos = append(pos, rest...) // after "--": all positional
			break
		}
		pos = append(pos, rest[0])
		args = rest[1:]
	}
	if len(pos) > positional {
		return usagef("unexpected argument %q", pos[positional])
	}
	// fs.Args() is what the commands read: parse the positionals alone.
	fs.Parse(append([]string{"--"}, pos...))
	return nil
}

// printHelp prints a command's synopsis and flags on stdout.
func printHelp(fs *flag.FlagSet) {
	fmt.Fprintln(helpOut, synopsis(fs.Name()))
	if s, ok := commands[fs.Name()]; ok {
		fmt.Fprintln(helpOut, "  "+s.summary)
	}
	fmt.Fprintln(helpOut, "flags:")
	fs.SetOutput(helpOut)
	fs.PrintDefaults()
	fs.SetOutput(io.Discard)
}
