// Package cli is a program made of subcommands, the way tandem's are run:
// a registry of commands, one line and exit 2 for a usage error, -h on
// stdout with exit 0, and flags that may follow positional arguments.
//
// It owns the dispatch and the parsing; the commands, their flags and
// their synopses are the program's.
package cli

import (
	"errors"
	"flag"
	"fmt"
	"io"
	"maps"
	"os"
	"slices"
)

// UsageError is a bad command line: printed as one line, exit code 2.
type UsageError struct{ msg string }

func (e UsageError) Error() string { return e.msg }

// Usagef is a UsageError.
func Usagef(format string, a ...any) error { return UsageError{fmt.Sprintf(format, a...)} }

// Command is one subcommand.
type Command struct {
	Summary string
	Run     func(args []string) error
}

// App is a program's subcommands.
type App struct {
	// Name is the program's name, in usage lines and error messages.
	Name string
	// Version is what `NAME version` prints.
	Version func() string
	// Synopses are the usage lines of commands that take more than
	// flags, by the name of their flag set (the others' is "usage: NAME
	// COMMAND [flags]").
	Synopses map[string]string
	// SubSynopses are the usage of commands made of subcommands, printed
	// for COMMAND -h.
	SubSynopses map[string]string
	// UsageErrs are errors that, wrapped in a command's error, make it a
	// usage error too (exit 2).
	UsageErrs []error
	// Commands is the registry Register fills.
	Commands map[string]Command

	helpOut io.Writer // where -h and help print: Main's stdout
}

// Register adds a command.
func (a *App) Register(name, summary string, run func(args []string) error) {
	if a.Commands == nil {
		a.Commands = map[string]Command{}
	}
	a.Commands[name] = Command{summary, run}
}

// Main runs the command args name and returns the exit code: 0, 1 for a
// failed command, 2 for a usage error (printed as one line on stderr).
func (a *App) Main(args []string, stdout, stderr io.Writer) int {
	a.helpOut = stdout
	if len(args) == 0 {
		a.printUsage(stderr) // no command: a usage error
		return 2
	}
	switch args[0] {
	case "help", "-h", "--help", "-help":
		if len(args) > 1 && args[0] == "help" {
			if _, ok := a.Commands[args[1]]; ok {
				return a.Main([]string{args[1], "-h"}, stdout, stderr)
			}
		}
		a.printUsage(stdout)
		return 0
	case "version", "--version", "-version":
		fmt.Fprintln(stdout, a.Version())
		return 0
	}
	cmd, ok := a.Commands[args[0]]
	if !ok {
		fmt.Fprintf(stderr, "%s: unknown command %q; run '%s help' for the list\n", a.Name, args[0], a.Name)
		return 2
	}
	if s, ok := a.SubSynopses[args[0]]; ok && len(args) > 1 && isHelp(args[1]) {
		fmt.Fprintf(stdout, "%s\n  %s\n", s, cmd.Summary)
		return 0
	}
	err := cmd.Run(args[1:])
	if err == nil || errors.Is(err, flag.ErrHelp) {
		return 0
	}
	fmt.Fprintf(stderr, "%s %s: %v\n", a.Name, args[0], err)
	if a.isUsage(err) {
		return 2
	}
	return 1
}

func isHelp(arg string) bool { return arg == "-h" || arg == "--help" || arg == "-help" }

func (a *App) isUsage(err error) bool {
	var ue UsageError
	if errors.As(err, &ue) {
		return true
	}
	for _, u := range a.UsageErrs {
		if errors.Is(err, u) {
			return true
		}
	}
	return false
}

func (a *App) printUsage(w io.Writer) {
	fmt.Fprintf(w, "usage: %s COMMAND [flags]   (%s COMMAND -h: its flags; %s version: the build)\n", a.Name, a.Name, a.Name)
	for _, n := range slices.Sorted(maps.Keys(a.Commands)) {
		fmt.Fprintf(w, "  %-10s %s\n", n, a.Commands[n].Summary)
	}
}

// NewFlagSet makes a flag set whose parse errors come back as errors
// (Parse makes them UsageErrors) rather than printing the whole usage.
func NewFlagSet(name string) *flag.FlagSet {
	fs := flag.NewFlagSet(name, flag.ContinueOnError)
	fs.SetOutput(io.Discard)
	return fs
}

// Parse parses args into fs and turns the flag package's errors into
// one-line UsageErrors; more than positional positional arguments are
// refused. Flags may follow positional arguments (NAME analyze FILE
// --json); after "--" every argument is positional. -h prints the
// synopsis and the flags on Main's stdout and returns flag.ErrHelp.
// fs.Args() holds the positional arguments afterwards.
func (a *App) Parse(fs *flag.FlagSet, args []string, positional int) error {
	var pos []string
	for {
		if err := fs.Parse(args); err != nil {
			if errors.Is(err, flag.ErrHelp) {
				a.printHelp(fs)
				return err
			}
			return Usagef("%v", err)
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
		return Usagef("unexpected argument %q", pos[positional])
	}
	// fs.Args() is what the commands read: parse the positionals alone.
	fs.Parse(append([]string{"--"}, pos...))
	return nil
}

// printHelp prints a command's synopsis and flags.
func (a *App) printHelp(fs *flag.FlagSet) {
	w := a.helpOut
	if w == nil {
		w = os.Stdout
	}
	syn, ok := a.Synopses[fs.Name()]
	if !ok {
		syn = "usage: " + a.Name + " " + fs.Name() + " [flags]"
	}
	fmt.Fprintln(w, syn)
	if s, ok := a.Commands[fs.Name()]; ok {
		fmt.Fprintln(w, "  "+s.Summary)
	}
	fmt.Fprintln(w, "flags:")
	fs.SetOutput(w)
	fs.PrintDefaults()
	fs.SetOutput(io.Discard)
}
