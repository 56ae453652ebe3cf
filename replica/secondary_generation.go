package replica

// Generation is the generation of the primary whose stream built the
// committed image: the Generation of that stream's handshake, which a
// stored image keeps in its Hello line. ok is false without an image. Raft
// lets a node resume an image only if it is of the committed generation.
func (s *Secondary) Generation() (gen uint64, ok bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.current == nil {
		return 0, false
	}
	return s.currentH.Generation, true
}
