package api

import (
	"context"
	"fmt"
	"io"
	"net/http"
	"time"

	dto "github.com/prometheus/client_model/go"
	"github.com/prometheus/common/expfmt"
	"github.com/prometheus/common/model"
)

// maxMetrics bounds a /metrics answer: a node exports a few hundred
// series, tens of KiB.
const maxMetrics = 8 << 20

// Metrics fetches GET /metrics and parses the Prometheus text format.
func (c *Client) Metrics(ctx context.Context) (map[string]*dto.MetricFamily, error) {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, c.base+"/metrics", nil)
	if err != nil {
		return nil, err
	}
	resp, err := c.http.Do(req)
	if err != nil {
		return nil, fmt.Errorf("api %s: %w", c.base, err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return nil, fmt.Errorf("api %s: /metrics: %s", c.base, resp.Status)
	}
	p := expfmt.NewTextParser(model.UTF8Validation)
	fams, err := p.TextToMetricFamilies(io.LimitReader(resp.Body, maxMetrics))
	if err != nil {
		return nil, fmt.Errorf("api %s: /metrics: %w", c.base, err)
	}
	return fams, nil
}

// SlowEvent is one entry of GET /debug/slow: a phase, handler or device
// operation that took longer than the node's slow threshold.
type SlowEvent struct {
	Name     string        `json:"name"`
	Start    time.Time     `json:"start"`
	Duration time.Duration `json:"duration_ns"`
	Millis   float64       `json:"duration_ms"`
}

// SlowList is the JSON of GET /debug/slow, oldest first.
type SlowList struct {
	Slow []SlowEvent `json:"slow"`
}

// Slow fetches GET /debug/slow.
func (c *Client) Slow(ctx context.Context) ([]SlowEvent, error) {
	var l SlowList
	if err := c.Get(ctx, "/debug/slow", &l); err != nil {
		return nil, err
	}
	return l.Slow, nil
}
