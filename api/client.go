package api

import (
	"bytes"
	"context"
	"crypto/tls"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"syscall"
	"time"
)

// DefaultTimeout bounds every call of a Client made by NewClient whose
// context has no earlier deadline.
const DefaultTimeout = 10 * time.Second

// Client talks to one node's API: over HTTPS with a client certificate
// (the node requires one of the cluster's CA) when made with a TLS
// configuration, plain HTTP otherwise. Every call takes a context and is
// bounded by the HTTP client's timeout as well.
type Client struct {
	base string
	http *http.Client
}

// NewClient is a client of the API at addr (HOST:PORT). tc, when not nil,
// is the caller's TLS identity (for Tandem's own: trust.Identity's
// ClientTLS("")); timeout bounds each call (0: DefaultTimeout).
func NewClient(addr string, tc *tls.Config, timeout time.Duration) *Client {
	scheme, hc := NewHTTPClient(tc, timeout)
	return NewClientHTTP(scheme+"://"+addr, hc)
}

// NewClientHTTP is a client of the API at base ("http://HOST:PORT" or
// https) over hc, which may be shared by clients of many nodes.
func NewClientHTTP(base string, hc *http.Client) *Client {
	return &Client{base: base, http: hc}
}

// NewHTTPClient is an HTTP client of nodes' APIs: https with tc's
// identity, or plain http when tc is nil, each call bounded by timeout
// (0: DefaultTimeout).
func NewHTTPClient(tc *tls.Config, timeout time.Duration) (scheme string, hc *http.Client) {
	if timeout <= 0 {
		timeout = DefaultTimeout
	}
	if tc == nil {
		return "http", &http.Client{Timeout: timeout}
	}
	tr := &http.Transport{
		DialContext:         (&net.Dialer{Timeout: 5 * time.Second}).DialContext,
		TLSClientConfig:     tc,
		TLSHandshakeTimeout: 5 * time.Second,
		MaxIdleConnsPerHost: 4,
		IdleConnTimeout:     30 * time.Second,
	}
	return "https", &http.Client{Timeout: timeout, Transport: tr}
}

// Base is the URL the client talks to ("http://HOST:PORT" or https).
func (c *Client) Base() string { return c.base }

// Status is GET /status; digest adds memory_digest (a running node scans
// its guest's memory for it) or a secondary's committed_digest.
func (c *Client) Status(ctx context.Context, digest bool) (Status, error) {
	var st Status
	path := "/status"
	if digest {
		path += "?digest=1"
	}
	err := c.Get(ctx, path, &st)
	return st, err
}

// Switchover is POST /switchover on a raft cluster's primary: it hands
// the guest to the secondary after a final epoch.
func (c *Client) Switchover(ctx context.Context) (SwitchoverResult, error) {
	var out SwitchoverResult
	err := c.Post(ctx, "/switchover", nil, &out)
	return out, err
}

// Activate is POST /activate on a pair's secondary: it resumes the guest
// from the committed image. force activates even though the primary is
// still heard.
func (c *Client) Activate(ctx context.Context, force bool) (ActivateResult, error) {
	var body any
	if force {
		body = map[string]bool{"force": true}
	}
	var out ActivateResult
	err := c.Post(ctx, "/activate", body, &out)
	return out, err
}

// Protect is POST /protect on a pair's primary: it streams epochs to the
// secondary at data address secondary ("" drops protection); name, with
// TLS, is the node the secondary's certificate must name ("" keeps the
// one given before).
func (c *Client) Protect(ctx context.Context, secondary, name string) (ProtectResult, error) {
	var out ProtectResult
	err := c.Post(ctx, "/protect", map[string]string{"secondary": secondary, "name": name}, &out)
	return out, err
}

// Migrate is POST /migrate: it starts a live migration (Status follows
// it).
func (c *Client) Migrate(ctx context.Context, req MigrateRequest) error {
	return c.Post(ctx, "/migrate", req, nil)
}

// Quit is POST /quit: the node stops.
func (c *Client) Quit(ctx context.Context) error {
	return c.Post(ctx, "/quit", nil, nil)
}

// Get is GET path, its JSON answer decoded into out (nil: dropped).
func (c *Client) Get(ctx context.Context, path string, out any) error {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, c.base+path, nil)
	if err != nil {
		return err
	}
	return c.do(req, out)
}

// Post is POST path with body as JSON (nil: an empty body), its JSON
// answer decoded into out (nil: dropped).
func (c *Client) Post(ctx context.Context, path string, body, out any) error {
	var buf []byte
	if body != nil {
		var err error
		if buf, err = json.Marshal(body); err != nil {
			return err
		}
	}
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, c.base+path, bytes.NewReader(buf))
	if err != nil {
		return err
	}
	req.Header.Set("Content-Type", "application/json")
	return c.do(req, out)
}

func (c *Client) do(req *http.Request, out any) error {
	resp, err := c.http.Do(req)
	if err != nil {
		if errors.Is(err, syscall.ECONNREFUSED) {
			return &NoAPIError{Addr: req.URL.Host, Err: err}
		}
		return fmt.Errorf("api %s: %w", c.base, err)
	}
	defer resp.Body.Close()
	if resp.StatusCode >= 300 {
		var e ErrorBody
		json.NewDecoder(io.LimitReader(resp.Body, 1<<16)).Decode(&e)
		if e.Error == "" {
			e.Error = resp.Status
		}
		if e.Code == "" {
			e.Code = DefaultCode(resp.StatusCode)
		}
		return &Error{HTTPStatus: resp.StatusCode, Code: e.Code, Message: e.Error}
	}
	if out == nil {
		return nil
	}
	if err := json.NewDecoder(io.LimitReader(resp.Body, maxBody)).Decode(out); err != nil {
		return fmt.Errorf("api %s: %w", c.base, err)
	}
	return nil
}

// NoAPIError is a call whose connection was refused: nothing listens at
// Addr (no node, or not its --api address).
type NoAPIError struct {
	Addr string
	Err  error
}

func (e *NoAPIError) Error() string {
	return fmt.Sprintf("no tandem API at %s (connection refused): give the --api address of a running node", e.Addr)
}

func (e *NoAPIError) Unwrap() error { return e.Err }

// maxBody bounds an answer the client decodes: a status is a few KiB.
const maxBody = 4 << 20
