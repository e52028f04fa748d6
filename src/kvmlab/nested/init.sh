#!/bin/sh
# /init of the kvmlab lab VM (an initramfs booted with rdinit=/init; see kvmlab.nested.rootfs).
# Brings up the virtio NIC (qemu user networking: 10.0.2.15, gateway 10.0.2.2), installs the
# public key the host passed on the kernel command line (kvmlab.key=<base64>), prints its ssh host
# key and then, sshd started, the ready marker with the guest uptime on ttyS0. kvmlab then drives
# it over ssh, the host key pinned.
PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
export PATH
say() { echo "kvmlab-labvm: $* $(cut -d' ' -f1 /proc/uptime)" > /dev/ttyS0; }
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mkdir -p /dev/pts /dev/shm /run/sshd /tmp /root/.ssh
mount -t devpts devpts /dev/pts
mount -t tmpfs tmpfs /dev/shm
mount -t tmpfs tmpfs /run
mkdir -p /run/sshd
mount -t debugfs debugfs /sys/kernel/debug
say "init"
hostname kvmlab-labvm
modprobe virtio_pci
modprobe virtio_net
ip link set lo up
ip link set eth0 up
ip addr add 10.0.2.15/24 dev eth0
ip route add default via 10.0.2.2
echo "nameserver 10.0.2.3" > /etc/resolv.conf
say "net"
ssh-keygen -A >/dev/null 2>&1
# the host pins this key from the serial console (a channel no one else is on) before it ssh-es in
echo "kvmlab-labvm: hostkey $(cut -d' ' -f1,2 /etc/ssh/ssh_host_ed25519_key.pub)" > /dev/ttyS0
sed -n 's/.*kvmlab\.key=\([^ ]*\).*/\1/p' /proc/cmdline | base64 -d > /root/.ssh/authorized_keys
chmod 700 /root/.ssh
chmod 600 /root/.ssh/authorized_keys
/usr/sbin/sshd -e -o UseDNS=no
say "ready uptime"
while :; do sleep 3600; done
