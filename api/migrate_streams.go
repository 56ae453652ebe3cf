package api

import "context"

// MaxMigrateStreams bounds MigrateStreamsRequest.Streams.
const MaxMigrateStreams = 16

// MigrateStreamsRequest is a POST /migrate body with the fields added
// after MigrateRequest; a node that does not know them ignores them.
type MigrateStreamsRequest struct {
	MigrateRequest
	// Streams is how many goroutines encode the migration stream (page
	// hashes, compression, checksums), 1 to MaxMigrateStreams; 0 means
	// 1. The stream stays one connection whose sections keep their order.
	Streams int `json:"streams,omitempty"`
}

// MigrateStreams is POST /migrate with the fields of MigrateStreamsRequest.
func (c *Client) MigrateStreams(ctx context.Context, req MigrateStreamsRequest) error {
	return c.Post(ctx, "/migrate", req, nil)
}
