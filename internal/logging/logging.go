package logging

import (
	"fmt"
	"io"
	"log/slog"
	"strings"
)

// Options are a logger's format and level, as the flags give them.
type Options struct {
	// Format is "text" (logfmt, the default) or "json" (one object a
	// line).
	Format string
	// Level is "debug", "info" (the default), "warn" or "error".
	Level string
}

// Formats and Levels are the accepted values, for help texts.
const (
	Formats = "text|json"
	Levels  = "debug|info|warn|error"
)

// ParseFormat checks a --log-format value.
func ParseFormat(s string) (string, error) {
	switch f := strings.ToLower(s); f {
	case "", "text":
		return "text", nil
	case "json":
		return "json", nil
	}
	return "", fmt.Errorf("%q: want %s", s, Formats)
}

// ParseLevel reads a --log-level value.
func ParseLevel(s string) (slog.Level, error) {
	switch strings.ToLower(s) {
	case "debug":
		return slog.LevelDebug, nil
	case "", "info":
		return slog.LevelInfo, nil
	case "warn", "warning":
		return slog.LevelWarn, nil
	case "error":
		return slog.LevelError, nil
	}
	return 0, fmt.Errorf("%q: want %s", s, Levels)
}

// New is a logger writing to w with o's format and level.
func New(w io.Writer, o Options) (*slog.Logger, error) {
	format, err := ParseFormat(o.Format)
	if err != nil {
		return nil, fmt.Errorf("--log-format %w", err)
	}
	level, err := ParseLevel(o.Level)
	if err != nil {
		return nil, fmt.Errorf("--log-level %w", err)
	}
	ho := &slog.HandlerOptions{Level: level}
	if format == "json" {
		return slog.New(slog.NewJSONHandler(w, ho)), nil
	}
	return slog.New(slog.NewTextHandler(w, ho)), nil
}
