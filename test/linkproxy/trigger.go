package linkproxy

import (
	"bytes"
	"sync"
)

// Direction is one way through the proxy.
type Direction int

const (
	// Up is client to target (the dialling side to the listening side).
	Up Direction = iota
	// Down is target to client.
	Down
)

func (d Direction) String() string {
	if d == Up {
		return "up"
	}
	return "down"
}

// trigger is an armed CutOn.
type trigger struct {
	dir     Direction
	pattern []byte
	fired   chan struct{}
	once    sync.Once
}

// CutOn arms a one-shot fault: the first read in direction dir whose
// bytes contain pattern is not delivered, and its connection is cut
// (reset to both peers), as if the link died just as that message was
// on it. The pattern must arrive within one read (a short control line
// sent on its own does). The returned channel is closed when it fired.
// Arming again replaces an armed trigger of the same direction.
func (p *Proxy) CutOn(dir Direction, pattern []byte) <-chan struct{} {
	t := &trigger{dir: dir, pattern: append([]byte(nil), pattern...), fired: make(chan struct{})}
	p.mu.Lock()
	if p.triggers == nil {
		p.triggers = map[Direction]*trigger{}
	}
	p.triggers[dir] = t
	p.mu.Unlock()
	return t.fired
}

// tripped says whether data read in dir fires an armed trigger (which is
// then disarmed): the caller drops data and cuts the link.
func (p *Proxy) tripped(dir Direction, data []byte) bool {
	p.mu.Lock()
	t := p.triggers[dir]
	if t == nil || !bytes.Contains(data, t.pattern) {
		p.mu.Unlock()
		return false
	}
	delete(p.triggers, dir)
	p.mu.Unlock()
	t.once.Do(func() { close(t.fired) })
	return true
}
