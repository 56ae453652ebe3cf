// Package vfs is the one seam through which Tandem touches storage: the
// secondary's stored image, snapshot files, the data dir's identity files
// and the virtual disk all open, write, sync and rename through an FS.
//
// Three implementations:
//
//   - Default (OS) is the real file system.
//   - MemFS is an in-memory file system that remembers what was made
//     durable: a file's data is durable once File.Sync returns, a
//     directory entry (a create, rename or remove) once SyncDir of its
//     directory returns. Crash forgets everything else, or with tearing
//     keeps a random prefix of each file's unsynced writes (the last one
//     possibly cut short), as a power loss may. It is the oracle the crash
//     tests trust, and is tested as such.
//   - Inject wraps any FS and fails chosen operations (the Nth write,
//     fsync or rename, or those on a path).
//
// WriteFileAtomic is the one way a whole file is published: write a
// temporary file, fsync it, rename it over the name, fsync the directory,
// every error checked.
//
// The package must never hide an error: every failed sync, rename or
// directory sync reaches the caller. It holds no lock across I/O on the
// OS; MemFS holds its own mutex only over memory copies.
package vfs
