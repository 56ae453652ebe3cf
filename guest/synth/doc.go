// Package synth is the software guest: a guest.Guest for hosts without KVM
// and for fast tests. Memory is one anonymous private mapping at GPA 0
// (MAP_NORESERVE, so a sparse 64 GiB guest costs only the pages it
// touches); vCPUs are goroutines running a workload in short work units;
// dirty tracking is done in software.
//
// It owns the guest's memory mapping, its dirty log, its vCPU goroutines
// (stopped in Close), its console and its disk (guest/block). It must never
// run a vCPU work unit longer than a few microseconds (Pause waits for the
// unit in progress), never let a vCPU block without a way out (every wait
// selects on the pause kick and on Close), and never be the only backend a
// feature is proven on.
//
// # Workloads
//
// dirty: each vCPU first touches its share of the --touch range with the
// --fill profile (default: one 8-byte store per page; random, text, mixed
// or a file's bytes, guest/fill.go, the same bytes the KVM micro-guest
// writes; a file is copied in by the host at boot), then writes
// --dirty-rate pages per second (split among the vCPUs) in seq, random or
// hot order (hot: 10% of the pages take 90% of the writes). A write stores
// --write-bytes (default 8) of --write-data (default: the write counter) at
// a pseudo-random 8-aligned offset. The rate is paced by the wall
// clock with a small backlog cap, and time spent throttled earns no credit.
// With a disk, every 64th page write also writes that page to the disk.
// A dirty guest does not read its console: input to it is dropped.
//
// kv: vCPU 0 serves the line protocol of docs/OPERATIONS.md (guest/kvproto) on the
// console; other vCPUs idle. The table (sized by guest memory: 2,093,048
// slots in 1 GiB) and the per-client record of the
// highest seq and last reply live in guest memory (kvtable.go), so a
// checkpoint of memory captures them. Replies are handed to the output sink
// on the vCPU, in the work unit that served the request, so every reply to
// a request served before a Pause has reached the sink when Pause returns.
// Malformed requests get an ERR reply and are not recorded; a full table
// ("table full") is a recorded reply, too many clients is not (there is no
// slot to record it in). With a disk, each change writes its 512-byte slot
// to the disk at slot*512.
//
// # Lifecycle and restore
//
// New returns a paused guest with zero memory. The workload boots on the
// first Resume (kv: the table header is written) unless LoadState ran
// first: then it continues from the loaded state and whatever memory the
// caller wrote into Regions()[0].Mem. Restore is New + fill memory +
// LoadState.
//
// # Dirty tracking
//
// Every guest store goes through the memory API (memory.go), which stores
// the data and then ORs the page's bit into an atomic bitmap; SyncDirty
// swaps non-zero words out and hands them to the log with OrWords. This was
// chosen over userfaultfd write-protection (UFFDIO_WRITEPROTECT, which
// would let the workload use plain stores and take a fault per first write
// to a page per round) because it is simple, portable and exact; its cost
// is measured by BenchmarkGuestWrite against a raw store.
//
// # Pause
//
// vCPUs look at an atomic flag between work units; Pause sets it, closes a
// kick channel that wakes vCPUs sleeping inside a unit, and waits until the
// last vCPU parks. BenchmarkPause reports p50/p99.
//
// Lock order: Guest.ctl, then console.mu; block.Disk's locks are taken
// after either and never call back.
package synth
