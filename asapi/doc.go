// Package asapi is the homeserver's HTTP client for the Matrix Application
// Service API: transactions, user and alias queries, ping and third-party
// lookups.
package asapi
