// Package e2e runs dendrite-asdispatch as a process against application
// services on httptest servers, with real client-server calls over loopback.
package e2e
