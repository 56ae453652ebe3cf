package main

import (
	"bufio"
	"cmp"
	"encoding/json"
	"fmt"
	"io"
	"os"

	"github.com/tandemvm/tandem/checkpoint"
	"github.com/tandemvm/tandem/guest"
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
	br := bufio.NewReaderSize(src, 1<<20)
	// A snapshot file opens with the data channel's handshake line.
	var hello map[string]any
	if b, err := br.Peek(1); err == nil && b[0] == '{' {
		line, err := br.ReadSlice('\n')
		if err != nil {
			return fmt.Errorf("snapshot handshake line: %w", err)
		}
		if err := json.Unmarshal(line, &hello); err != nil {
			return fmt.Errorf("snapshot handshake line: %w", err)
		}
	}
	rep, aerr := checkpoint.Analyze(br)
	if *asJSON {
		enc := json.NewEncoder(os.Stdout)
		enc.SetIndent("", "  ")
		if err := enc.Encode(struct {
			Snapshot map[string]any `json:"snapshot,omitempty"`
			checkpoint.Report
		}{hello, rep}); err != nil {
			return err
		}
	} else {
		if hello != nil {
			fmt.Printf("snapshot of a %v guest, %s\n", hello["guest_kind"], describeConfig(hello["config"]))
		}
		if err := rep.WriteText(os.Stdout); err != nil {
			return err
		}
	}
	if aerr != nil {
		return fmt.Errorf("stream is damaged: %w", aerr)
	}
	return nil
}

// describeConfig is a snapshot's guest configuration in human units.
func describeConfig(v any) string {
	b, _ := json.Marshal(v)
	var cfg guest.Config
	if json.Unmarshal(b, &cfg) != nil {
		return fmt.Sprintf("config %v", v)
	}
	out := fmt.Sprintf("memory %s, %d vCPUs, workload %s", guest.FormatSize(cfg.Memory), cfg.VCPUs, cmp.Or(cfg.Workload.Kind, "none"))
	if cfg.Disk != "" {
		out += ", disk " + cfg.Disk
	}
	return out
}
