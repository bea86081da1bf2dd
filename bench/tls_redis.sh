# Sourced by bench/mux_*.sh: a throwaway TLS redis-server for one bench script.
#
# Needs $work (a directory the caller removes) and the array pids (the caller kills them on
# exit). Defines free_port, and start_tls_redis, which makes a CA and a certificate for
# localhost (webpki refuses a self-signed end entity), starts a TLS-only redis-server with
# password bench-key and sets tls_port.

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

start_tls_redis() {
    openssl req -x509 -newkey rsa:2048 -nodes -keyout "$work/ca.key" -out "$work/ca.pem" -days 1 \
        -subj "/CN=bench-ca" 2>/dev/null
    openssl req -newkey rsa:2048 -nodes -keyout "$work/key.pem" -out "$work/srv.csr" \
        -subj "/CN=localhost" 2>/dev/null
    printf "subjectAltName=DNS:localhost\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n" \
        >"$work/ext.cnf"
    openssl x509 -req -in "$work/srv.csr" -CA "$work/ca.pem" -CAkey "$work/ca.key" \
        -CAcreateserial -out "$work/cert.pem" -days 1 -extfile "$work/ext.cnf" 2>/dev/null

    tls_port="$(free_port)"
    redis-server --port 0 --tls-port "$tls_port" --tls-cert-file "$work/cert.pem" \
        --tls-key-file "$work/key.pem" --tls-ca-cert-file "$work/ca.pem" --tls-auth-clients no \
        --requirepass bench-key --save '' --appendonly no --dir "$work" >"$work/redis.log" 2>&1 &
    pids+=($!)
}
