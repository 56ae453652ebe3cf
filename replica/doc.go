// Package replica is the receiving side of every stream: it applies a
// checkpoint stream into a staging area (Image), commits each epoch
// atomically into the memory of a paused, never-run guest, acknowledges it,
// and hands a committed image to its backend to resume (a migration's
// destination, an activated secondary). It also holds the sending end of
// the data channel (Link), so the handshake lives in one place.
//
// The data channel: the sender writes one JSON line (Hello), the receiver
// answers one JSON line (HelloReply) and refuses anything it cannot take
// (another guest kind, format version or purpose) before the sender has
// paused anything; then the sender writes a checkpoint stream and the
// receiver writes one JSON acknowledgement line (precopy.Ack) per epoch it
// commits (replicate) or once, when the guest resumes (migrate).
//
// Migration is two-phase when the Hello asks for it (Commit): the
// destination loads the final epoch, acknowledges Ready and waits,
// paused, for the source's control line (Control: commit or abort) after
// the final epoch; it resumes only on commit, and without either it hands
// the paused guest back to its caller (AwaitingCommit), never resuming on
// a guess. A secondary that is activated writes a last acknowledgement
// with Activated set on its primary's connection, and refuses later joins
// with HelloReply.Activated: the primary is fenced. These fields are
// optional; older peers ignore them (docs/PAIR-AND-MIGRATION.md).
//
// It must never make a partly received epoch visible (a migration
// destination writes pages through to a guest it discards if the stream
// fails, which nobody sees: Image.WriteThrough), never let the
// receiving guest run before the image is consistent (an epoch with
// machine state committed after the last live-sync epoch), and never
// block without a deadline: every read and write on a data connection has
// one, and the whole Hello one deadline (HandshakeTimeout), not one per
// read.
//
// It must never open a path that came from a sender: a guest is built from
// the sender's configuration with its paths replaced (Receiver.localConfig:
// the disk at Receiver.DiskPath, no kvm image), and so is one read back
// from a Store or a snapshot file. And it must never hold more than it
// chose to: an epoch stages at most the guest's memory plus MaxEpochDisk
// (Image.SetBudget, ErrStagingBudget). See docs/SECURITY.md, "Input bounds
// and paths".
//
// Durability (docs/DURABILITY.md): a Secondary's Store keeps memory,
// devices and the whole disk of one epoch together in image.tnd, fsynced
// before each acknowledgement (SyncDisk) or right after it (SyncMemory),
// and rebuilds the disk file from it on Load; every file goes through
// internal/vfs, and the failpoints in durability.go mark each step for
// the crash sweep. It must never acknowledge under SyncDisk what it could
// not fsync, and never load memory of one epoch beside disk of another.
//
// Locks: no lock is held across disk I/O. Image.mu guards the committed
// image against activation; an epoch's disk writes run outside it, and
// Image.committing makes Activate and Close wait for an epoch whose disk
// write has begun (so an activation does wait for that one epoch's disk
// writes: a half-applied disk cannot be handed over), and for a
// secondary's acknowledged epoch whose pages Settle has not yet copied
// into memory (image_settle.go), but never for a Store's rewrite. A
// Store's rewrite copies memory under it one batch at a time and
// compresses and writes with it released (Store.writeImage says why that
// is a consistent image). Secondary.mu is never held while calling into
// an Image: the two are never held together.
package replica
