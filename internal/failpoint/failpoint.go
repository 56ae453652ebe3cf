package failpoint

import (
	"errors"
	"fmt"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
)

// ErrInjected is what an armed point returns unless its action says
// otherwise; errors.Is finds it through any wrapping.
var ErrInjected = errors.New("failpoint: injected failure")

// A Point is one named place in the code. Its zero value is not usable:
// make points with New.
type Point struct {
	name  string
	armed atomic.Bool

	// mu guards action (read only while armed).
	mu     sync.Mutex
	action func() error
	hits   atomic.Uint64
}

// registry holds every point made by New, by name.
var registry struct {
	mu     sync.Mutex
	points map[string]*Point
}

// New declares the point name. Names are unique; a second New with the
// same name panics (a programming error found at init).
func New(name string) *Point {
	registry.mu.Lock()
	defer registry.mu.Unlock()
	if registry.points == nil {
		registry.points = map[string]*Point{}
	}
	if _, dup := registry.points[name]; dup {
		panic(fmt.Sprintf("failpoint: %q declared twice", name))
	}
	p := &Point{name: name}
	registry.points[name] = p
	return p
}

// Name is the point's name.
func (p *Point) Name() string { return p.name }

// Hit runs the point's action if a test armed it, and returns its error;
// disarmed it returns nil after one atomic load.
func (p *Point) Hit() error {
	if !p.armed.Load() {
		return nil
	}
	return p.hit()
}

func (p *Point) hit() error {
	p.mu.Lock()
	action := p.action
	p.mu.Unlock()
	if action == nil {
		return nil
	}
	p.hits.Add(1)
	if err := action(); err != nil {
		return fmt.Errorf("%w at %s: %w", ErrInjected, p.name, err)
	}
	return nil
}

// Hits is how many times the point ran an action since it was armed.
func (p *Point) Hits() uint64 { return p.hits.Load() }

// Enable arms the point: each Hit runs action and returns its error
// (wrapped with ErrInjected), nil meaning go on. It returns the function
// that disarms it again. A nil action makes Hit return ErrInjected.
func (p *Point) Enable(action func() error) (disable func()) {
	if action == nil {
		action = func() error { return errors.New("armed") }
	}
	p.mu.Lock()
	p.action = action
	p.mu.Unlock()
	p.hits.Store(0)
	p.armed.Store(true)
	return func() {
		p.armed.Store(false)
		p.mu.Lock()
		p.action = nil
		p.mu.Unlock()
	}
}

// Lookup finds a declared point by name.
func Lookup(name string) (*Point, bool) {
	registry.mu.Lock()
	defer registry.mu.Unlock()
	p, ok := registry.points[name]
	return p, ok
}

// Names lists the declared points whose names start with prefix, sorted.
func Names(prefix string) []string {
	registry.mu.Lock()
	defer registry.mu.Unlock()
	var out []string
	for n := range registry.points {
		if strings.HasPrefix(n, prefix) {
			out = append(out, n)
		}
	}
	slices.Sort(out)
	return out
}
