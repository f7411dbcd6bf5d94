// natter from C++: the seed's example on localhost with RAII handles and std::thread.
// A broker, bob listening, alice forwarding a local port to an echo service on bob's side;
// bytes through the forward must come back unchanged. Exit code 0 and "ok" on success.
#include <natter.h>

#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cstdlib>
#include <iostream>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

namespace {

natter_handle checked(natter_handle rc, const std::string &what) {
    if (rc < 0) throw std::runtime_error(what + " failed: " + natter_last_error());
    return rc;
}

// Owns one natter handle and closes it with the right function.
class Handle {
  public:
    Handle(natter_handle h, int (*close)(natter_handle)) : h_(h), close_(close) {}
    Handle(const Handle &) = delete;
    Handle &operator=(const Handle &) = delete;
    ~Handle() {
        if (h_ > 0) close_(h_);
    }
    natter_handle get() const { return h_; }

  private:
    natter_handle h_;
    int (*close_)(natter_handle);
};

class EchoServer {
  public:
    EchoServer() {
        sockaddr_in addr{};
        addr.sin_family = AF_INET;
        addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
        socklen_t len = sizeof addr;
        fd_ = socket(AF_INET, SOCK_STREAM, 0);
        if (fd_ < 0 || bind(fd_, reinterpret_cast<sockaddr *>(&addr), sizeof addr) < 0 || listen(fd_, 16) < 0 ||
            getsockname(fd_, reinterpret_cast<sockaddr *>(&addr), &len) < 0)
            throw std::runtime_error("echo server");
        port_ = ntohs(addr.sin_port);
        thread_ = std::thread([this] { serve(); });
        thread_.detach();
    }
    int port() const { return port_; }

  private:
    void serve() {
        for (;;) {
            int conn = accept(fd_, nullptr, nullptr);
            if (conn < 0) return;
            std::vector<char> buf(65536);
            ssize_t n;
            while ((n = read(conn, buf.data(), buf.size())) > 0)
                if (write(conn, buf.data(), static_cast<size_t>(n)) != n) break;
            close(conn);
        }
    }
    int fd_ = -1;
    int port_ = 0;
    std::thread thread_;
};

bool round_trip(int port, const std::string &payload) {
    sockaddr_in addr{};
    addr.sin_family = AF_INET;
    addr.sin_port = htons(static_cast<uint16_t>(port));
    addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    if (fd < 0 || connect(fd, reinterpret_cast<sockaddr *>(&addr), sizeof addr) < 0) return false;
    std::thread writer([&] {
        if (write(fd, payload.data(), payload.size()) == static_cast<ssize_t>(payload.size())) shutdown(fd, SHUT_WR);
    });
    std::string got;
    std::vector<char> buf(65536);
    ssize_t n;
    while ((n = read(fd, buf.data(), buf.size())) > 0) got.append(buf.data(), static_cast<size_t>(n));
    writer.join();
    close(fd);
    return got == payload;
}

std::string temp_dir(const std::string &name) {
    std::string pattern = "/tmp/natter-cpp-" + name + "-XXXXXX";
    std::vector<char> buf(pattern.begin(), pattern.end());
    buf.push_back('\0');
    if (!mkdtemp(buf.data())) throw std::runtime_error("mkdtemp");
    return buf.data();
}

}  // namespace

int main() {
    try {
        EchoServer echo;
        std::cout << "natter " << natter_version() << "\n";
        Handle broker(checked(natter_broker_listen("127.0.0.1:0"), "broker"), natter_broker_close);
        std::string broker_addr = "127.0.0.1:" + std::to_string(checked(natter_broker_port(broker.get()), "port"));
        Handle bob(checked(natter_client_new("bob", broker_addr.c_str(), temp_dir("bob").c_str()), "bob"),
                   natter_client_close);
        checked(natter_client_listen(bob.get()), "bob listen");
        Handle alice(checked(natter_client_new("alice", broker_addr.c_str(), temp_dir("alice").c_str()), "alice"),
                     natter_client_close);
        std::string remote = ":" + std::to_string(echo.port());
        Handle forward(checked(natter_client_forward(alice.get(), "127.0.0.1:0", "bob", remote.c_str()), "forward"),
                       natter_forward_close);
        checked(natter_client_connect(alice.get(), "bob", 20.0), "tunnel");
        int port = static_cast<int>(checked(natter_forward_port(forward.get()), "forward port"));
        std::string payload(1 << 20, '\0');
        for (size_t i = 0; i < payload.size(); i++) payload[i] = static_cast<char>(i * 13 + i / 253);
        bool ok = round_trip(port, payload);
        std::cout << (ok ? "ok" : "MISMATCH") << ": " << payload.size() << " bytes through 127.0.0.1:" << port
                  << " -> bob:" << echo.port() << "\n";
        return ok ? 0 : 1;
    } catch (const std::exception &e) {
        std::cerr << e.what() << "\n";
        return 1;
    }
}
