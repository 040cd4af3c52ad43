// Package integration holds end-to-end tests that run asdispatch as users do:
// the built binary as a child process, real application services on 127.0.0.1.
// It is its own module so that AS frameworks used as test peers (mautrix-go)
// never become dependencies of the library.
package integration
