//go:build tools

package tandem

import (
	_ "github.com/hashicorp/go-msgpack/v2/codec"
	_ "github.com/hashicorp/raft"
	_ "github.com/hashicorp/raft-boltdb/v2"
	_ "github.com/klauspost/compress/zstd"
	_ "github.com/prometheus/client_golang/prometheus"
	_ "golang.org/x/sys/unix"
)
