// Package tlstest makes throwaway certificate authorities and certificates
// for tests, so no private key is ever committed. Keys are ECDSA P-256
// (fast to generate); files go to the test's temporary directory.
package tlstest

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"math/big"
	"net"
	"os"
	"path/filepath"
	"sync/atomic"
	"testing"
	"time"
)

// CA is a test certificate authority.
type CA struct {
	Cert   *x509.Certificate
	key    *ecdsa.PrivateKey
	PEM    []byte // the CA certificate
	CAFile string // PEM file of the CA certificate
	Pool   *x509.CertPool
	dir    string
	serial atomic.Int64
	tb     testing.TB
}

// NewCA makes a CA named name whose files live in tb's temporary directory.
func NewCA(tb testing.TB, name string) *CA {
	tb.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		tb.Fatal(err)
	}
	tmpl := &x509.Certificate{
		SerialNumber:          big.NewInt(1),
		Subject:               pkix.Name{CommonName: name},
		NotBefore:             time.Now().Add(-time.Hour),
		NotAfter:              time.Now().Add(24 * time.Hour),
		IsCA:                  true,
		BasicConstraintsValid: true,
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageDigitalSignature,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		tb.Fatal(err)
	}
	cert, _ := x509.ParseCertificate(der)
	ca := &CA{Cert: cert, key: key, dir: tb.TempDir(), tb: tb, Pool: x509.NewCertPool()}
	ca.Pool.AddCert(cert)
	ca.PEM = pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der})
	ca.CAFile = filepath.Join(ca.dir, name+"-ca.pem")
	if err := os.WriteFile(ca.CAFile, ca.PEM, 0o600); err != nil {
		tb.Fatal(err)
	}
	ca.serial.Store(1)
	return ca
}

// Leaf is an issued certificate: PEM bytes and the files holding them.
type Leaf struct {
	CertPEM, KeyPEM   []byte
	CertFile, KeyFile string
	Cert              *x509.Certificate
}

// TLS returns the leaf as a tls.Certificate.
func (l *Leaf) TLS(tb testing.TB) tls.Certificate {
	c, err := tls.X509KeyPair(l.CertPEM, l.KeyPEM)
	if err != nil {
		tb.Fatal(err)
	}
	return c
}

// Issue makes a server and client certificate for names (DNS names,
// wildcards, or IP addresses) with CommonName cn, valid for a day.
func (ca *CA) Issue(cn string, names ...string) *Leaf {
	return ca.IssueValid(cn, time.Now().Add(-time.Hour), time.Now().Add(24*time.Hour), names...)
}

// IssueValid is Issue with an explicit validity period.
func (ca *CA) IssueValid(cn string, notBefore, notAfter time.Time, names ...string) *Leaf {
	tb := ca.tb
	tb.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		tb.Fatal(err)
	}
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(ca.serial.Add(1)),
		Subject:      pkix.Name{CommonName: cn},
		NotBefore:    notBefore,
		NotAfter:     notAfter,
		KeyUsage:     x509.KeyUsageDigitalSignature,
		ExtKeyUsage:  []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth},
	}
	for _, n := range names {
		if ip := net.ParseIP(n); ip != nil {
			tmpl.IPAddresses = append(tmpl.IPAddresses, ip)
		} else {
			tmpl.DNSNames = append(tmpl.DNSNames, n)
		}
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, ca.Cert, &key.PublicKey, ca.key)
	if err != nil {
		tb.Fatal(err)
	}
	kder, err := x509.MarshalPKCS8PrivateKey(key)
	if err != nil {
		tb.Fatal(err)
	}
	cert, _ := x509.ParseCertificate(der)
	l := &Leaf{
		CertPEM: pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}),
		KeyPEM:  pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: kder}),
		Cert:    cert,
	}
	n := ca.serial.Load()
	l.CertFile = filepath.Join(ca.dir, cn+"-"+big.NewInt(n).String()+".pem")
	l.KeyFile = filepath.Join(ca.dir, cn+"-"+big.NewInt(n).String()+".key")
	if err := os.WriteFile(l.CertFile, l.CertPEM, 0o600); err != nil {
		tb.Fatal(err)
	}
	if err := os.WriteFile(l.KeyFile, l.KeyPEM, 0o600); err != nil {
		tb.Fatal(err)
	}
	return l
}

// ClientConfig returns a tls.Config that trusts ca, for serverName.
func (ca *CA) ClientConfig(serverName string) *tls.Config {
	return &tls.Config{RootCAs: ca.Pool, ServerName: serverName}
}

// WriteFile replaces path atomically (write to a temporary file in the same
// directory, then rename), as certificate renewal tools do.
func WriteFile(tb testing.TB, path string, data []byte) {
	tb.Helper()
	tmp := path + ".tmp"
	if err := os.WriteFile(tmp, data, 0o600); err != nil {
		tb.Fatal(err)
	}
	if err := os.Rename(tmp, path); err != nil {
		tb.Fatal(err)
	}
}
