package ft

import (
	"context"
	"encoding/json"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"

	"github.com/tandemvm/tandem/api"
	"github.com/tandemvm/tandem/internal/netlimit"
	"github.com/tandemvm/tandem/internal/timing"
)

// APIServer serves a node's JSON status and control endpoints and its
// Prometheus metrics. Every role (run, receive, primary, secondary,
// witness) shares it and adds its own handlers.
type APIServer struct {
	ln      net.Listener
	srv     *http.Server
	mux     *http.ServeMux
	reg     *prometheus.Registry
	timings *timing.Recorder
	quit    chan struct{} // closed by POST /quit
	served  chan struct{} // closed when the Serve goroutine Start began has returned
}

// NewAPIServer listens on addr: HTTPS with a client certificate of the
// cluster's CA required (any one: operators and nodes alike) when nt has
// an identity, plain HTTP on loopback (or anywhere with --insecure)
// otherwise.
func NewAPIServer(addr string, log *slog.Logger, nt Trust) (*APIServer, error) {
	ln, err := nt.Listen(log, "--api", addr, "api", netlimit.APICap)
	if err != nil {
		return nil, err
	}
	reg := prometheus.NewRegistry()
	reg.MustRegister(collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	a := &APIServer{
		ln:      ln,
		mux:     http.NewServeMux(),
		reg:     reg,
		timings: timing.New(reg, log, timing.DefaultSlowThreshold),
		quit:    make(chan struct{}),
	}
	a.mux.Handle("GET /metrics", promhttp.HandlerFor(reg, promhttp.HandlerOpts{}))
	a.mux.HandleFunc("GET /debug/slow", func(w http.ResponseWriter, r *http.Request) {
		WriteJSON(w, http.StatusOK, map[string]any{"slow": a.timings.SlowPhases()})
	})
	// Handlers run concurrently: two POST /quit at once must not both
	// close the channel (a plain bool raced and double-closed).
	var quitOnce sync.Once
	a.mux.HandleFunc("POST /quit", func(w http.ResponseWriter, r *http.Request) {
		WriteJSON(w, http.StatusOK, map[string]any{"ok": true})
		quitOnce.Do(func() { close(a.quit) })
	})
	a.srv = &http.Server{
		Handler: a.mux,
		// A request's headers within 5 s and all of it within 10 s (the
		// bodies are a few hundred bytes); a slow client cannot hold a
		// connection by trickling.
		ReadHeaderTimeout: apiReadHeaderTimeout,
		ReadTimeout:       apiReadTimeout,
		// The handler and the response within 60 s: generous, because
		// GET /status?digest=1 on a running node scans the guest's memory
		// (seconds for tens of GiB) and POST /switchover waits up to 20 s.
		WriteTimeout: apiWriteTimeout,
		IdleTimeout:  apiIdleTimeout,
		// A connection counts against the cap (netlimit.APICap) while it
		// has no request in progress: a flood of idle or half-sent ones
		// displaces the oldest of them, never a request being served.
		ConnState: func(c net.Conn, s http.ConnState) {
			lc, ok := netlimit.Of(c) // under TLS, the connection under it
			if !ok {
				return
			}
			switch s {
			case http.StateActive:
				lc.Established()
			case http.StateIdle:
				lc.Pending()
			}
		},
		// ReadHeaderTimeout also bounds a TLS handshake (net/http
		// completes it first, within that deadline); refused handshakes
		// are logged by the server, as warnings.
		ErrorLog: slog.NewLogLogger(log.Handler(), slog.LevelWarn),
	}
	return a, nil
}

// Timeouts of the API's HTTP server (see NewAPIServer).
const (
	apiReadHeaderTimeout = 5 * time.Second
	apiReadTimeout       = 10 * time.Second
	apiWriteTimeout      = 60 * time.Second
	apiIdleTimeout       = 60 * time.Second
)

// Start serves the API on a goroutine that Close stops and joins.
func (a *APIServer) Start() {
	a.served = make(chan struct{})
	go func() {
		defer close(a.served)
		a.srv.Serve(a.ln)
	}()
}

func (a *APIServer) Addr() string { return a.ln.Addr().String() }

func (a *APIServer) Close() {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
	defer cancel()
	if a.srv.Shutdown(ctx) != nil {
		// Requests still running after 2 s: close their connections.
		a.srv.Close()
	}
	if a.served == nil {
		a.ln.Close() // never started
		return
	}
	<-a.served // Serve returns as soon as Shutdown has closed its listener
}

func WriteJSON(w http.ResponseWriter, code int, v any) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(code)
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	enc.Encode(v)
}

// WriteError answers {"error": MESSAGE, "code": CODE}: code is the kind
// of error a client tells apart (api.ErrNotPrimary, ...); "" takes the
// HTTP status's default (api.DefaultCode).
func WriteError(w http.ResponseWriter, status int, code api.Code, err error) {
	if code == "" {
		code = api.DefaultCode(status)
	}
	WriteJSON(w, status, api.ErrorBody{Error: err.Error(), Code: code})
}

// HandleFunc adds a handler (before Start).
func (a *APIServer) HandleFunc(pattern string, h http.HandlerFunc) { a.mux.HandleFunc(pattern, h) }

// Quit is closed by POST /quit.
func (a *APIServer) Quit() <-chan struct{} { return a.quit }

// readForce reads an optional {"force": BOOL} body (an empty body is
// false). On a bad body it answers 400 and returns ok=false.
func readForce(w http.ResponseWriter, r *http.Request) (force, ok bool) {
	var req struct {
		Force bool `json:"force"`
	}
	if r.ContentLength != 0 {
		if err := json.NewDecoder(http.MaxBytesReader(w, r.Body, 1<<12)).Decode(&req); err != nil {
			WriteError(w, http.StatusBadRequest, api.CodeBadRequest, fmt.Errorf("want {\"force\": BOOL}: %v", err))
			return false, false
		}
	}
	return req.Force, true
}
