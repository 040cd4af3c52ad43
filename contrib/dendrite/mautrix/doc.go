// Package mautrix runs an unmodified mautrix-go appservice.AppService
// against dendrite-asdispatch. It is a module of its own so that
// mautrix-go's requirements never raise the versions dendrite-asdispatch
// is built with (see contrib/dendrite/README.md, "Tests").
package mautrix
