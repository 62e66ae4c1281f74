"""The migration link: frames and their codec (`framing`), an authenticated connection
(`connection`), mutual TLS (`tls`), the listening socket (`listener`)."""
