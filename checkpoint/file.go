package checkpoint

import (
	"bufio"
	"fmt"
	"io"
	"os"
	"path/filepath"

	"github.com/tandemvm/tandem/guest"
)

// fileHooks lets tests fail the steps of WriteFileAtomic (the package's
// only disk access) without real faulty hardware.
var fileHooks struct {
	beforeSync, beforeRename func() error
}

func hook(f func() error) error {
	if f == nil {
		return nil
	}
	return f()
}

// WriteFileAtomic publishes a file at path whose content write produces:
// it writes a temporary file in the same directory, fsyncs it, renames it
// over path and fsyncs the directory. A reader of path sees the old file
// or the complete new one, never a part; after a crash the same holds.
// On error the temporary file is removed and path is untouched.
func WriteFileAtomic(path string, write func(io.Writer) error) (err error) {
	dir, base := filepath.Split(path)
	if dir == "" {
		dir = "."
	}
	f, err := os.CreateTemp(dir, "."+base+".tmp-*")
	if err != nil {
		return fmt.Errorf("checkpoint: create temporary file for %s: %w", path, err)
	}
	tmp := f.Name()
	defer func() {
		if err != nil {
			f.Close()
			os.Remove(tmp)
		}
	}()
	bw := bufio.NewWriterSize(f, 1<<20)
	if err := write(bw); err != nil {
		return fmt.Errorf("checkpoint: write %s: %w", path, err)
	}
	if err := bw.Flush(); err != nil {
		return fmt.Errorf("checkpoint: write %s: %w", path, err)
	}
	if err := hook(fileHooks.beforeSync); err != nil {
		return err
	}
	if err := f.Sync(); err != nil {
		return fmt.Errorf("checkpoint: fsync %s: %w", tmp, err)
	}
	if err := f.Close(); err != nil {
		return fmt.Errorf("checkpoint: close %s: %w", tmp, err)
	}
	if err := hook(fileHooks.beforeRename); err != nil {
		return err
	}
	if err := os.Rename(tmp, path); err != nil {
		return fmt.Errorf("checkpoint: publish %s: %w", path, err)
	}
	d, err := os.Open(dir)
	if err != nil {
		return fmt.Errorf("checkpoint: open directory %s: %w", dir, err)
	}
	defer d.Close()
	if err := d.Sync(); err != nil {
		return fmt.Errorf("checkpoint: fsync directory %s: %w", dir, err)
	}
	return nil
}

// WriteSnapshot writes a complete snapshot file atomically: a stream with
// FlagSnapshot, the given pages, state and disk writes as epoch 0, then
// STREAM-END.
func WriteSnapshot(path string, h Header, opts Options, pages []Page, ms guest.MachineState, disk []guest.DiskWrite) error {
	h.Flags |= FlagSnapshot
	return WriteFileAtomic(path, func(w io.Writer) error {
		cw, err := NewWriter(w, h, opts)
		if err != nil {
			return err
		}
		defer cw.Close()
		if err := cw.WritePages(pages); err != nil {
			return err
		}
		if err := cw.WriteDevices(ms); err != nil {
			return err
		}
		if err := cw.WriteDisk(disk); err != nil {
			return err
		}
		if _, err := cw.EndEpoch(0); err != nil {
			return err
		}
		return cw.EndStream()
	})
}

// RestoreFile restores the snapshot at path into t.
func RestoreFile(path string, lim Limits, t Target) (Header, error) {
	f, err := os.Open(path)
	if err != nil {
		return Header{}, fmt.Errorf("checkpoint: %w", err)
	}
	defer f.Close()
	return Restore(bufio.NewReaderSize(f, 1<<20), lim, t)
}
