package checkpoint

import (
	"bufio"
	"fmt"
	"io"

	"github.com/tandemvm/tandem/guest"
	"github.com/tandemvm/tandem/internal/vfs"
)

// WriteFileAtomic publishes a file at path whose content write produces,
// on the real file system: see WriteFileAtomicFS.
func WriteFileAtomic(path string, write func(io.Writer) error) error {
	return WriteFileAtomicFS(vfs.Default, path, write)
}

// WriteFileAtomicFS publishes a file at path on fsys with
// vfs.WriteFileAtomic: a temporary file in the same directory, fsynced,
// renamed over path, the directory fsynced. A reader of path sees the old
// file or the complete new one, never a part; after a crash the same
// holds. On error the temporary file is removed and path is untouched
// (unless only the directory sync failed: then the error says the new
// file may not be durable).
func WriteFileAtomicFS(fsys vfs.FS, path string, write func(io.Writer) error) error {
	if err := vfs.WriteFileAtomic(fsys, path, 0o600, write); err != nil {
		return fmt.Errorf("checkpoint: %w", err)
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
	f, err := vfs.Default.Open(path)
	if err != nil {
		return Header{}, fmt.Errorf("checkpoint: %w", err)
	}
	defer f.Close()
	return Restore(bufio.NewReaderSize(f, 1<<20), lim, t)
}
