package guest

import (
	"bytes"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/klauspost/compress/zstd"
)

// TestFillRatios: random does not compress, text compresses about 3:1 with
// the zstd level Tandem sends with (SpeedFastest) over a batch of pages,
// and mixed has its documented share of zero pages.
func TestFillRatios(t *testing.T) {
	enc, err := zstd.NewWriter(nil, zstd.WithEncoderLevel(zstd.SpeedFastest), zstd.WithEncoderConcurrency(1))
	if err != nil {
		t.Fatal(err)
	}
	const pages = 1024
	ratio := func(kind int) float64 {
		buf := make([]byte, pages*PageSize)
		for p := 0; p < pages; p++ {
			FillPage(buf[p*PageSize:(p+1)*PageSize], kind, 7, uint64(p))
		}
		return float64(len(buf)) / float64(len(enc.EncodeAll(buf, nil)))
	}
	if r := ratio(FillKindRandom); r > 1.001 {
		t.Errorf("random fill compresses %.3f:1, want incompressible", r)
	}
	if r := ratio(FillKindText); r < 2.7 || r > 3.4 {
		t.Errorf("text fill compresses %.2f:1, want about 3:1", r)
	}
	var classes [4]int
	for p := uint64(0); p < 100000; p++ {
		classes[MixedClass(7, p)]++
	}
	for c, want := range []int{MixedEmptyPct, MixedSparsePct, MixedTextPct, 100 - MixedEmptyPct - MixedSparsePct - MixedTextPct} {
		if got := classes[c]; got < want*1000-1000 || got > want*1000+1000 {
			t.Errorf("mixed: %d of 100000 pages of class %d, want about %d%%", got, c, want)
		}
	}
	t.Logf("batch ratios: text %.2f:1, mixed %.2f:1 (zero pages included)", ratio(FillKindText), ratio(FillKindMixed))
}

// TestFillDeterministic: the same seed and page give the same bytes,
// another seed other bytes.
func TestFillDeterministic(t *testing.T) {
	for _, kind := range []int{FillKindRandom, FillKindText} {
		a, b, c := make([]byte, PageSize), make([]byte, PageSize), make([]byte, PageSize)
		FillPage(a, kind, 1, 5)
		FillPage(b, kind, 1, 5)
		FillPage(c, kind, 2, 5)
		if !bytes.Equal(a, b) || bytes.Equal(a, c) {
			t.Errorf("kind %d: not a function of seed and page", kind)
		}
	}
	d := make([]byte, 100)
	WriteData(d, WriteKindText, 1, 2, 3)
	for _, ch := range d {
		if ch != ' ' && ch != '\n' && (ch < 'a' || ch > 'z') {
			t.Fatalf("text write data holds %q", ch)
		}
	}
}

// TestWriteOffset: every write fits its page, 8-aligned, and an 8-byte
// write lands where the synth guest's writes always did.
func TestWriteOffset(t *testing.T) {
	for _, n := range []int{8, 9, 100, 4000, 4095, 4096} {
		for c := uint64(0); c < 1000; c++ {
			off := WriteOffset(n, c, c*7)
			if off%8 != 0 || off+uint64(n) > PageSize {
				t.Fatalf("write of %d bytes at %d", n, off)
			}
		}
	}
	for c := uint64(0); c < 100; c++ {
		if got, old := WriteOffset(8, c, 3), Mix(c^3)%(PageSize/8)*8; got != old {
			t.Fatalf("8-byte write at %d, the old slot was %d", got, old)
		}
	}
}

// TestFillFromFile repeats a file that is not a multiple of a page.
func TestFillFromFile(t *testing.T) {
	file := []byte("0123456789")
	page := make([]byte, PageSize)
	FillFromFile(page, file, 3)
	want := bytes.Repeat(file, PageSize/len(file)*5)[3*PageSize%len(file):]
	if !bytes.Equal(page, want[:PageSize]) {
		t.Fatalf("page 3 of a 10-byte file: %q...", page[:20])
	}
}

// TestProfileBadInput: unknown profiles, out-of-range write sizes and
// missing or empty files are refused with the flag and the accepted forms.
func TestProfileBadInput(t *testing.T) {
	dir := t.TempDir()
	empty := filepath.Join(dir, "empty")
	if err := os.WriteFile(empty, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	base := Config{Memory: 64 << 20, VCPUs: 1, Workload: Workload{Kind: WorkloadDirty, Pattern: PatternRandom, Touch: 1 << 20}}
	for _, tc := range []struct {
		mut  func(w *Workload)
		want string
	}{
		{func(w *Workload) { w.Fill = "bogus" }, "--fill \"bogus\": want zero, random, text, mixed or file:PATH"},
		{func(w *Workload) { w.WriteBytes = 4 }, "--write-bytes 4: want 8 to 4096"},
		{func(w *Workload) { w.WriteBytes = 4097 }, "--write-bytes 4097: want 8 to 4096"},
		{func(w *Workload) { w.WriteData = "zeros" }, "--write-data \"zeros\": want random or text"},
	} {
		c := base
		tc.mut(&c.Workload)
		err := c.Validate()
		if err == nil || !errors.Is(err, ErrConfig) || !strings.Contains(err.Error(), tc.want) || strings.Contains(err.Error(), "\n") {
			t.Errorf("%+v: %v, want one line with %q", c.Workload, err, tc.want)
		}
	}
	for _, fill := range []string{"file:", "file:" + filepath.Join(dir, "missing"), "file:" + empty, "file:" + dir} {
		c := base
		c.Workload.Fill = fill
		if err := c.Validate(); err != nil {
			t.Errorf("Validate(%s) = %v: the file is the sender's check, not the config's", fill, err)
		}
		if err := CheckFillFile(fill); err == nil || !strings.Contains(err.Error(), "--fill "+fill) || !strings.Contains(err.Error(), "file:PATH") {
			t.Errorf("CheckFillFile(%s) = %v", fill, err)
		}
	}
	if err := CheckFillFile("random"); err != nil {
		t.Errorf("CheckFillFile(random) = %v", err)
	}
}
