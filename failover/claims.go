package failover

// ImageClaims is what a node's own claims did to the image it claimed
// with: the bookkeeping a coordinator keeps beside Decide so that its
// View's RunnableGen covers generations it claimed itself. failover.Node
// and the etcd coordinator keep one each. The zero value holds no claim.
type ImageClaims struct {
	// from/to: this node's claims raised the generation of the image it
	// claimed with from `from` to `to` (nothing was released under the
	// claimed generations before an activation).
	from, to uint64
	// tentFrom/tentTo: a claim made with the image of generation
	// tentFrom whose outcome the coordinator could not tell (raft lost
	// leadership while committing it; an etcd transaction timed out): it
	// may still commit. It becomes from/to once the record shows this
	// node holding tentTo, and is dropped once it shows anything else at
	// tentTo or above.
	tentFrom, tentTo uint64
}

// Committed records a claim that committed: made with the image of
// generation from, it raised it to to.
func (c *ImageClaims) Committed(from, to uint64) { c.from, c.to = from, to }

// Tentative records a claim whose outcome is not known.
func (c *ImageClaims) Tentative(from, to uint64) { c.tentFrom, c.tentTo = from, to }

// Reset forgets every claim: on activation the running guest becomes
// the image that counts.
func (c *ImageClaims) Reset() { *c = ImageClaims{} }

// Fill settles a tentative claim against v.State, then sets v's Runnable
// fields from img (nil: nothing runnable): its generation raised to the
// claim's when the claim was made with it, and for a live image (the
// node's own guest, the source of every epoch it acknowledged) its epoch
// raised to reported. self is this node's ID.
func (c *ImageClaims) Fill(v *View, self string, img *Image, reported uint64) {
	if c.tentTo != 0 {
		switch {
		case v.State.Generation == c.tentTo && v.State.Primary == self && img != nil && img.Generation == c.tentFrom:
			c.from, c.to = c.tentFrom, c.tentTo // it committed: ours
			c.tentFrom, c.tentTo = 0, 0
		case v.State.Generation >= c.tentTo:
			c.tentFrom, c.tentTo = 0, 0 // another claim holds it
		}
	}
	if img == nil {
		return
	}
	v.Runnable, v.RunnableEpoch, v.RunnableGen, v.RunnableLive = true, img.Epoch, img.Generation, img.Live
	if c.to != 0 && img.Generation == c.from {
		v.RunnableGen = c.to
	}
	if img.Live {
		v.RunnableEpoch = max(v.RunnableEpoch, reported)
	}
}
