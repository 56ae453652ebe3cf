package main

import (
	"encoding/json"
	"fmt"
	"io"
	"os"

	"github.com/tandemvm/tandem/replica"
)

func init() {
	register("analyze", "dump a stream or snapshot file section by section (FILE or - for stdin)", cmdAnalyze)
}

func cmdAnalyze(args []string) error {
	fs := newFlagSet("analyze")
	asJSON := fs.Bool("json", false, "print the report as JSON")
	if err := parseFlags(fs, args, 1); err != nil {
		return err
	}
	if fs.NArg() != 1 {
		return usagef("want one FILE, or - for stdin")
	}
	var src io.Reader = os.Stdin
	if name := fs.Arg(0); name != "-" {
		f, err := os.Open(name)
		if err != nil {
			return err
		}
		defer f.Close()
		src = f
	}
	a, aerr := replica.Analyze(src)
	if a == nil {
		return aerr
	}
	if *asJSON {
		enc := json.NewEncoder(os.Stdout)
		enc.SetIndent("", "  ")
		if err := enc.Encode(a); err != nil {
			return err
		}
	} else if err := a.WriteText(os.Stdout); err != nil {
		return err
	}
	if aerr != nil {
		return fmt.Errorf("stream is damaged: %w", aerr)
	}
	return nil
}
