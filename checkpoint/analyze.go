package checkpoint

import (
	"bufio"
	"encoding/hex"
	"fmt"
	"io"
	"strings"
	"text/tabwriter"

	"github.com/tandemvm/tandem/guest"
)

// Report is what Analyze finds in a stream. For a broken stream it holds
// everything up to the damage plus the error: that is when it is needed.
// JSON field names are part of `tandem analyze --json`'s contract.
type Report struct {
	Header      *Header       `json:"header,omitempty"`
	HeaderBytes int64         `json:"header_bytes"`
	Sections    []Section     `json:"sections"`
	Epochs      []EpochReport `json:"epochs"`
	Totals      Totals        `json:"totals"`
	// Complete is true when the stream ended with STREAM-END and no error.
	Complete bool `json:"complete"`
	// Error and ErrorOffset describe where reading stopped, if it did.
	Error       string `json:"error,omitempty"`
	ErrorOffset int64  `json:"error_offset,omitempty"`
	// DigestsVerified is false: Analyze checks structure, CRCs, limits and
	// epoch counts but holds no guest memory, so XOR deltas have no base
	// and epoch digests cannot be recomputed. Restore into a Target for that.
	DigestsVerified bool `json:"digests_verified"`
}

// EpochReport summarises one epoch.
type EpochReport struct {
	EpochEnd
	Digest    string     `json:"digest"`
	Offset    int64      `json:"offset"` // of the epoch's first section
	WireBytes int64      `json:"wire_bytes"`
	RawBytes  int64      `json:"raw_bytes"`
	Encodings PageCounts `json:"encodings"`
	Ratio     float64    `json:"ratio"` // raw over wire
}

// Totals sum the whole stream (what was read of it).
type Totals struct {
	WireBytes int64                    `json:"wire_bytes"` // header included
	RawBytes  int64                    `json:"raw_bytes"`
	Sections  int                      `json:"sections"`
	Epochs    int                      `json:"epochs"`
	Pages     PageCounts               `json:"pages"`
	Ratio     float64                  `json:"ratio"`
	ByType    map[string]SectionTotals `json:"by_type"`
}

// SectionTotals sum the sections of one type.
type SectionTotals struct {
	Count     int   `json:"count"`
	WireBytes int64 `json:"wire_bytes"`
	RawBytes  int64 `json:"raw_bytes"`
}

func ratio(raw, wire int64) float64 {
	if wire == 0 {
		return 0
	}
	return float64(raw) / float64(wire)
}

// Analyze reads a stream section by section without applying it and
// reports what it holds. It returns the report and, for a broken stream,
// the error that stopped it (also recorded in the report).
func Analyze(src io.Reader) (Report, error) {
	rep := Report{Sections: []Section{}, Epochs: []EpochReport{}, Totals: Totals{ByType: map[string]SectionTotals{}}}
	fail := func(err error, off int64) (Report, error) {
		rep.Error = err.Error()
		rep.ErrorOffset = off
		rep.Totals.Ratio = ratio(rep.Totals.RawBytes, rep.Totals.WireBytes)
		return rep, err
	}
	r, err := NewReader(bufio.NewReaderSize(src, 1<<20), Limits{})
	if err != nil {
		return fail(err, 0)
	}
	h := r.Header()
	rep.Header = &h
	rep.HeaderBytes = r.Offset()
	rep.Totals.WireBytes = r.Offset()
	cur := EpochReport{Offset: r.Offset()}
	for {
		off := r.Offset()
		s, err := r.Next(nil)
		if err == io.EOF {
			rep.Complete = true
			break
		}
		if err != nil {
			return fail(err, off)
		}
		rep.Sections = append(rep.Sections, s)
		t := &rep.Totals
		t.Sections++
		t.WireBytes += s.WireSize
		t.RawBytes += s.RawSize
		t.Pages = t.Pages.Plus(s.Pages)
		bt := t.ByType[s.TypeName]
		bt.Count++
		bt.WireBytes += s.WireSize
		bt.RawBytes += s.RawSize
		t.ByType[s.TypeName] = bt
		cur.WireBytes += s.WireSize
		cur.RawBytes += s.RawSize
		cur.Encodings = cur.Encodings.Plus(s.Pages)
		if s.Epoch != nil {
			cur.EpochEnd = *s.Epoch
			cur.Digest = hex.EncodeToString(s.Epoch.Digest[:])
			cur.Ratio = ratio(cur.RawBytes, cur.WireBytes)
			rep.Epochs = append(rep.Epochs, cur)
			t.Epochs++
			cur = EpochReport{Offset: r.Offset()}
		}
	}
	rep.Totals.Ratio = ratio(rep.Totals.RawBytes, rep.Totals.WireBytes)
	return rep, nil
}

func flagNames(f uint32) string {
	var names []string
	for _, n := range []struct {
		bit  uint32
		name string
	}{{FlagSnapshot, "snapshot"}, {FlagMigration, "migration"}, {FlagMicroCheckpoint, "micro-checkpoint"}} {
		if f&n.bit != 0 {
			names = append(names, n.name)
			f &^= n.bit
		}
	}
	if f != 0 {
		names = append(names, fmt.Sprintf("%#x", f))
	}
	if len(names) == 0 {
		return "none"
	}
	return strings.Join(names, ",")
}

func pageDetail(c PageCounts) string {
	return fmt.Sprintf("pages %d (zero %d, raw %d, stored %d, xor %d, run %d)", c.Total(), c.Zero, c.Raw, c.Stored, c.XOR, c.Run)
}

// WriteText renders the report for people: header, one line per section,
// one per epoch, totals, and the error last where it cannot be missed.
func (rep Report) WriteText(w io.Writer) error {
	bw := bufio.NewWriter(w)
	if h := rep.Header; h != nil {
		var total uint64
		var regs []string
		for _, r := range h.Regions {
			total += r.Size
			regs = append(regs, fmt.Sprintf("%#x+%s", r.GPA, guest.FormatSize(r.Size)))
		}
		fmt.Fprintf(bw, "stream: format version %d (readers from %d), build %q, guest %q, page size %d, flags %s, %d header bytes\n",
			h.Version, h.MinReader, h.Build, h.Kind, h.PageSize, flagNames(h.Flags), rep.HeaderBytes)
		fmt.Fprintf(bw, "memory: %s in %d regions: %s\n", guest.FormatSize(total), len(h.Regions), strings.Join(regs, " "))
	}
	// The summary first: the totals and the verdict, then each epoch,
	// then every section.
	t := rep.Totals
	fmt.Fprintf(bw, "total: %d sections, %d epochs, %s, wire %s, raw %s, %.1fx smaller\n",
		t.Sections, t.Epochs, pageDetail(t.Pages), sizeOf(t.WireBytes), sizeOf(t.RawBytes), t.Ratio)
	switch {
	case rep.Error != "":
		fmt.Fprintf(bw, "BROKEN at offset %d: %s\n", rep.ErrorOffset, rep.Error)
	case rep.Complete:
		fmt.Fprintf(bw, "complete (structure and CRCs checked; epoch digests need a restore to verify)\n")
	}
	for _, e := range rep.Epochs {
		fmt.Fprintf(bw, "epoch %d: %s, %d device sections, %d disk writes (%d bytes), wire %s, raw %s, %.1fx smaller, digest %s\n",
			e.Epoch, pageDetail(e.Encodings), e.DeviceSections, e.DiskWrites, e.DiskBytes, sizeOf(e.WireBytes), sizeOf(e.RawBytes), e.Ratio, e.Digest)
	}
	fmt.Fprintf(bw, "sections (offsets and sizes in bytes):\n")
	tw := tabwriter.NewWriter(bw, 2, 8, 2, ' ', tabwriter.AlignRight)
	fmt.Fprintf(tw, "offset\ttype\twire\traw\tratio\tcodec\t  detail\n")
	for _, s := range rep.Sections {
		var detail string
		switch s.Type {
		case SectionRAM:
			detail = pageDetail(s.Pages)
		case SectionDevice:
			detail = fmt.Sprintf("%d devices", s.Devices)
		case SectionDisk:
			detail = fmt.Sprintf("%d writes, %d bytes", s.DiskWrites, s.DiskBytes)
		case SectionEpochEnd:
			detail = fmt.Sprintf("epoch %d, %d pages, digest %s", s.Epoch.Epoch, s.Epoch.Pages, hex.EncodeToString(s.Epoch.Digest[:8]))
		default:
			if s.Skipped {
				detail = "skipped (unknown, skippable)"
			}
		}
		r := ""
		if s.RawSize > 0 {
			r = fmt.Sprintf("%.1fx", ratio(s.RawSize, s.WireSize))
		}
		fmt.Fprintf(tw, "%d\t%s\t%d\t%d\t%s\t%s\t  %s\n", s.Offset, s.TypeName, s.WireSize, s.RawSize, r, s.Codec, detail)
	}
	tw.Flush()
	return bw.Flush()
}

// sizeOf is a byte count in human units (binary, one decimal), exact
// below 1 KiB.
func sizeOf[T int64 | uint64 | int](n T) string {
	v := float64(n)
	for _, u := range []string{"B", "KiB", "MiB", "GiB"} {
		if v < 1024 || u == "GiB" {
			if u == "B" {
				return fmt.Sprintf("%d B", n)
			}
			return fmt.Sprintf("%.1f %s", v, u)
		}
		v /= 1024
	}
	return ""
}
