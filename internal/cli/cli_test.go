package cli

import (
	"bytes"
	"errors"
	"fmt"
	"strings"
	"testing"
)

var errSpecial = errors.New("special")

func testApp(got *[]string) *App {
	a := &App{Name: "prog", Version: func() string { return "v1" }, UsageErrs: []error{errSpecial},
		Synopses: map[string]string{"cat": "usage: prog cat [flags] FILE"}}
	a.Register("cat", "print a file", func(args []string) error {
		fs := NewFlagSet("cat")
		n := fs.Bool("n", false, "number lines")
		if err := a.Parse(fs, args, 1); err != nil {
			return err
		}
		*got = append([]string{fmt.Sprint(*n)}, fs.Args()...)
		return nil
	})
	a.Register("fail", "fails", func([]string) error { return errors.New("broken") })
	a.Register("special", "a usage error by wrapping", func([]string) error { return fmt.Errorf("x: %w", errSpecial) })
	return a
}

func TestMainExitCodes(t *testing.T) {
	var got []string
	a := testApp(&got)
	for _, tc := range []struct {
		args   []string
		code   int
		stdout string // prefix
		stderr string // prefix
	}{
		{nil, 2, "", "usage: prog COMMAND"},
		{[]string{"help"}, 0, "usage: prog COMMAND", ""},
		{[]string{"version"}, 0, "v1\n", ""},
		{[]string{"nope"}, 2, "", `prog: unknown command "nope"`},
		{[]string{"cat", "-h"}, 0, "usage: prog cat [flags] FILE\n  print a file\nflags:\n", ""},
		{[]string{"help", "cat"}, 0, "usage: prog cat [flags] FILE", ""},
		{[]string{"cat", "--bogus"}, 2, "", "prog cat: flag provided but not defined"},
		{[]string{"cat", "a", "b"}, 2, "", `prog cat: unexpected argument "b"`},
		{[]string{"fail"}, 1, "", "prog fail: broken\n"},
		{[]string{"special"}, 2, "", "prog special: x: special\n"},
	} {
		var out, errb bytes.Buffer
		code := a.Main(tc.args, &out, &errb)
		if code != tc.code || !strings.HasPrefix(out.String(), tc.stdout) || !strings.HasPrefix(errb.String(), tc.stderr) {
			t.Errorf("%v: exit %d, stdout %q, stderr %q; want %d, %q, %q", tc.args, code, out.String(), errb.String(), tc.code, tc.stdout, tc.stderr)
		}
		if tc.code == 2 && strings.Count(errb.String(), "\n") != 1 && len(tc.args) > 0 {
			t.Errorf("%v: a usage error in more than one line: %q", tc.args, errb.String())
		}
	}
}

// Flags may follow the positional argument; after "--" all are positional.
func TestParseFlagsAfterPositional(t *testing.T) {
	var got []string
	a := testApp(&got)
	var out, errb bytes.Buffer
	if code := a.Main([]string{"cat", "FILE", "-n"}, &out, &errb); code != 0 || strings.Join(got, " ") != "true FILE" {
		t.Fatalf("cat FILE -n: exit %d, %v, %q", code, got, errb.String())
	}
	if code := a.Main([]string{"cat", "--", "-n"}, &out, &errb); code != 0 || strings.Join(got, " ") != "false -n" {
		t.Fatalf("cat -- -n: exit %d, %v, %q", code, got, errb.String())
	}
}
