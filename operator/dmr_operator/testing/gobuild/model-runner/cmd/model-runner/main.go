// The real model-runner server for the project's real tier: upstream's server package, run the
// way its own entry point runs it (until SIGINT or SIGTERM), reporting the pinned release.
package main

import (
	"context"
	"fmt"
	"os"
	"os/signal"
	"syscall"

	"github.com/docker/model-runner/pkg/server"
)

// version is stamped by the build (-X main.version=...), as upstream stamps its own.
var version = "dev"

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	defer stop()
	if err := server.Run(ctx, server.Config{Version: version}); err != nil {
		fmt.Fprintf(os.Stderr, "model-runner: %v\n", err)
		os.Exit(1)
	}
}
