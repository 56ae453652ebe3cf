package block

import "github.com/tandemvm/tandem/internal/vfs"

// File is the open disk file. The disk reaches storage only through
// internal/vfs, Tandem's one filesystem seam, so tests can substitute a
// faulty, slow or crash-simulating file system (Options.FS).
type File = vfs.File
