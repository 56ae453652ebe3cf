package replica

import (
	"context"
	"errors"
	"testing"
	"time"

	"github.com/tandemvm/tandem/internal/trust"
)

// A data link without TLS reaches loopback only unless Insecure: the
// refusal comes before any connection, so no memory is ever sent.
func TestDialPlaintextOffLoopbackRefused(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
	defer cancel()
	_, err := Dial(ctx, "192.0.2.1:7092", Hello{Purpose: PurposeReplicate}, nil, DialOptions{})
	if !errors.Is(err, trust.ErrPlaintext) {
		t.Fatalf("plaintext dial off loopback: %v, want ErrPlaintext", err)
	}
	// With Insecure the rule no longer applies: the dial is attempted
	// (and fails on this unroutable test address, not on the rule).
	ctx2, cancel2 := context.WithTimeout(context.Background(), 200*time.Millisecond)
	defer cancel2()
	if _, err := Dial(ctx2, "192.0.2.1:7092", Hello{Purpose: PurposeReplicate}, nil, DialOptions{Insecure: true}); err == nil || errors.Is(err, trust.ErrPlaintext) {
		t.Fatalf("insecure dial: %v, want a connection error", err)
	}
}
