// Package integration holds end-to-end tests that run asdispatch as users do:
// the built binary as a child process, real application services on 127.0.0.1.
// It is its own module so that AS frameworks used as test peers (mautrix-go)
// never become dependencies of the library.
//
// The end-to-end encryption tests (mautrix-go clients and a bridgev2 bridge
// with crypto) need the goolm build tag, mautrix's pure-Go olm, so no C
// library is needed: go test -tags goolm ./integration/
package integration
