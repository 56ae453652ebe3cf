package replica

import (
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"path/filepath"

	"github.com/tandemvm/tandem/internal/fsperm"
	"github.com/tandemvm/tandem/internal/vfs"
)

// A secondary that retired after a protected move (the guest runs at the
// destination, from later than anything it holds) must stay retired when
// it is restarted: its stored image would otherwise be offered again with
// no trace of the move, and an activation would run a second, stale copy
// of the guest. So retire writes DIR/moved.json (durably, before it
// answers the commit), LoadStored reads it back, and only a primary's
// full image adopted afterwards removes it.

const storeMovedFile = "moved.json"

// maxMovedBytes bounds the marker read back: it holds one Move.
const maxMovedBytes = 4096

// SaveMoved makes the retired move mv durable in the store's directory.
// It touches only its own file, so it may run beside the receiving
// goroutine's use of the store.
func (s *Store) SaveMoved(mv Move) error {
	mv.Open, mv.Done = false, true
	path := filepath.Join(s.dir, storeMovedFile)
	err := s.within(path, func() error {
		return vfs.WriteFileAtomic(s.fs, path, fsperm.File, func(w io.Writer) error {
			return json.NewEncoder(w).Encode(mv)
		})
	})
	if err != nil {
		return fmt.Errorf("replica store: record the move: %w", err)
	}
	return nil
}

// LoadMoved returns the retired move recorded in the store, if any. A
// marker that cannot be read counts as one (the error says why): a
// secondary that may have retired must not offer its image.
func (s *Store) LoadMoved() (*Move, error) {
	path := filepath.Join(s.dir, storeMovedFile)
	f, err := s.fs.Open(path)
	if errors.Is(err, fs.ErrNotExist) {
		return nil, nil
	}
	mv := &Move{MigrationID: "(unknown)", Destination: "(unknown)", Done: true}
	if err != nil {
		return mv, fmt.Errorf("replica store: %w", err)
	}
	defer f.Close()
	b, err := io.ReadAll(io.LimitReader(f, maxMovedBytes+1))
	switch {
	case err != nil:
		return mv, fmt.Errorf("replica store: read %s: %w", path, err)
	case len(b) > maxMovedBytes:
		return mv, fmt.Errorf("replica store: %s is over %d bytes", path, maxMovedBytes)
	}
	if err := json.Unmarshal(b, mv); err != nil {
		return mv, fmt.Errorf("replica store: %s: %w", path, err)
	}
	mv.Open, mv.Done = false, true
	return mv, nil
}

// ClearMoved removes the move marker (a primary's full image replaced the
// image the move left behind) and makes the removal durable.
func (s *Store) ClearMoved() error {
	path := filepath.Join(s.dir, storeMovedFile)
	if err := s.fs.Remove(path); errors.Is(err, fs.ErrNotExist) {
		return nil
	} else if err != nil {
		return fmt.Errorf("replica store: %w", err)
	}
	if err := s.within(s.dir, func() error { return s.fs.SyncDir(s.dir) }); err != nil {
		return fmt.Errorf("replica store: fsync directory %s: %w", s.dir, err)
	}
	return nil
}
