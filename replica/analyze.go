package replica

import (
	"bufio"
	"cmp"
	"encoding/json"
	"fmt"
	"io"

	"github.com/tandemvm/tandem/checkpoint"
	"github.com/tandemvm/tandem/guest"
)

// Analysis is a stream or snapshot file taken apart section by section
// (what `tandem analyze` prints).
type Analysis struct {
	// Snapshot is a snapshot file's handshake line, every field as the
	// file has it (a newer build's too); nil for a bare stream.
	Snapshot map[string]any `json:"snapshot,omitempty"`
	checkpoint.Report
}

// Analyze reads a checkpoint stream, or a snapshot file (a FileLink's:
// the Hello line, then the stream), to its end. A damaged stream's error
// comes with the analysis of what came before the damage; a bad handshake
// line is an error with no analysis (nil).
func Analyze(r io.Reader) (*Analysis, error) {
	br := bufio.NewReaderSize(r, 1<<20)
	var a Analysis
	if b, err := br.Peek(1); err == nil && b[0] == '{' {
		if err := readLine(br, &a.Snapshot); err != nil {
			return nil, fmt.Errorf("snapshot handshake line: %w", err)
		}
	}
	var err error
	a.Report, err = checkpoint.Analyze(br)
	return &a, err
}

// WriteText writes the analysis for a reader: the snapshot's guest, if a
// snapshot, then the report.
func (a *Analysis) WriteText(w io.Writer) error {
	if a.Snapshot != nil {
		if _, err := fmt.Fprintf(w, "snapshot of a %v guest, %s\n", a.Snapshot["guest_kind"], describeConfig(a.Snapshot["config"])); err != nil {
			return err
		}
	}
	return a.Report.WriteText(w)
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
