package block

import "os"

// File is the part of *os.File the disk uses.
type File interface {
	WriteAt(p []byte, off int64) (int, error)
	ReadAt(p []byte, off int64) (int, error)
	Sync() error
	Close() error
}

// FS opens disk files. It is the one seam through which the disk touches
// storage, so tests can substitute a faulty or slow implementation.
type FS interface {
	OpenFile(name string, flag int, perm os.FileMode) (File, error)
}

// OSFS is the real file system.
type OSFS struct{}

// OpenFile opens name with os.OpenFile.
func (OSFS) OpenFile(name string, flag int, perm os.FileMode) (File, error) {
	return os.OpenFile(name, flag, perm)
}
