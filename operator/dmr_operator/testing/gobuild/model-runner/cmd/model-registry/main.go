// A model registry on loopback for the project's real tier: the in-memory OCI registry upstream
// tests its own pulls against, holding model artifacts that upstream's builder makes from local
// GGUF files (what `docker model package` pushes). The real model-runner then pulls them the way
// it pulls from Docker Hub, with DEFAULT_REGISTRY and INSECURE_REGISTRY=true pointing at us.
//
// Usage: model-registry -listen 127.0.0.1:0 -model ai/gemma3:270m=/path/model.gguf [-model ...]
// Each -model is its own model (its own ID), even when two name the same file.
// Prints "published <name> <bytes>" per model, then "listening <host:port>" once it serves.
package main

import (
	"context"
	"flag"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/signal"
	"strings"
	"syscall"
	"time"

	"github.com/docker/model-runner/pkg/distribution/builder"
	"github.com/docker/model-runner/pkg/distribution/registry"
	"github.com/docker/model-runner/pkg/distribution/registry/testregistry"
)

// publications collects repeated -model name=path flags.
type publications []string

func (p *publications) String() string     { return strings.Join(*p, ",") }
func (p *publications) Set(v string) error { *p = append(*p, v); return nil }

func main() {
	listen := flag.String("listen", "127.0.0.1:0", "address to serve the registry on")
	var models publications
	flag.Var(&models, "model", "name:tag=path of a GGUF file to publish (repeatable)")
	flag.Parse()

	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	defer stop()

	listener, err := net.Listen("tcp", *listen)
	if err != nil {
		fail("listen: %v", err)
	}
	server := &http.Server{Handler: testregistry.New(), ReadHeaderTimeout: 10 * time.Second}
	go func() {
		if err := server.Serve(listener); err != nil && err != http.ErrServerClosed {
			fail("serve: %v", err)
		}
	}()
	address := listener.Addr().String()

	client := registry.NewClient(registry.WithPlainHTTP(true))
	for index, model := range models {
		name, path, ok := strings.Cut(model, "=")
		if !ok {
			fail("-model %q: want name:tag=path", model)
		}
		// A creation time fixed by position keeps each digest the same on every run, and makes
		// the same file under two names two models (two IDs, one shared GGUF layer).
		created := time.Unix(int64(index), 0).UTC()
		artifact, err := builder.FromPath(path, builder.WithCreated(created))
		if err != nil {
			fail("package %s: %v", path, err)
		}
		target, err := client.NewTarget(address + "/" + name)
		if err != nil {
			fail("target %s: %v", name, err)
		}
		if err := artifact.Build(ctx, target, io.Discard); err != nil {
			fail("push %s: %v", name, err)
		}
		info, _ := os.Stat(path)
		fmt.Printf("published %s %d\n", name, info.Size())
	}
	fmt.Printf("listening %s\n", address)

	<-ctx.Done()
	shutdown, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	_ = server.Shutdown(shutdown)
}

func fail(format string, args ...any) {
	fmt.Fprintf(os.Stderr, "model-registry: "+format+"\n", args...)
	os.Exit(1)
}
