package config

// TLS terminates TLS on a websocket listener (nginx `listen 443 ssl`).
// Owned by the TLS work (issue 13); fields are filled in there.
type TLS struct{}

// SNI routes a tls_passthrough listener by the ClientHello's server name
// without decrypting (nginx stream ssl_preread).
type SNI struct{}

// Keepalive keeps NAT and cloud-balancer state alive on idle connections
// and detects dead peers (nginx so_keepalive, HAProxy clitcpka/srvtcpka).
type Keepalive struct{}

// validateTLS checks a listener's TLS, SNI and Keepalive settings; field is
// the listener's path ("listeners[0]").
func validateTLS(l *Listener, field string, bad func(field, format string, args ...any)) {}
