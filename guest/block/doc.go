// Package block is Tandem's virtual disk: a file-backed block device with
// asynchronous writes, a flush that honours a deadline, a log of completed
// writes for replication, and fault injection for tests.
//
// It owns the disk file, one worker goroutine that performs writes and
// flushes in submission order, and the log of writes completed since the
// last TakeWrites. All file access goes through the FS seam (fs.go) so tests
// can inject failed writes or stalled flushes without real hardware.
//
// It must never block a caller without a bound: Write only queues, Flush
// takes a context and returns ErrFlushDeadline (wrapped) while the flush
// goes on in the background, and Close waits for the worker for at most
// CloseTimeout. It never imports anything above guest.
//
// Lock order: Disk.mu, then Disk.fileMu. The worker never holds mu while it
// performs I/O, so a stalled flush never blocks Write, TakeWrites or Flush's
// deadline.
package block
