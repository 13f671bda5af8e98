#!/bin/sh
# vmfork stage-2 boot script (busybox init ::sysinit on the overlay root).
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin

mount -t tmpfs -o nosuid,nodev,mode=0755 tmpfs /run
mount -t tmpfs -o nosuid,nodev,mode=1777 tmpfs /tmp
mkdir -p /dev/pts /dev/shm
mount -t devpts -o nosuid,noexec,gid=5,mode=0620,ptmxmode=0666 devpts /dev/pts
mount -t tmpfs -o nosuid,nodev,mode=1777 tmpfs /dev/shm
[ -e /dev/fd ] || ln -s /proc/self/fd /dev/fd
[ -e /dev/stdin ] || ln -s /proc/self/fd/0 /dev/stdin
[ -e /dev/stdout ] || ln -s /proc/self/fd/1 /dev/stdout
[ -e /dev/stderr ] || ln -s /proc/self/fd/2 /dev/stderr

name=vmfork
for arg in $(cat /proc/cmdline); do
	case "$arg" in
	vmfork.hostname=?*) name=${arg#vmfork.hostname=} ;;
	esac
done
hostname "$name"
echo "$name" >/etc/hostname
printf '127.0.0.1\tlocalhost\n127.0.1.1\t%s\n::1\t\tlocalhost ip6-localhost ip6-loopback\n' "$name" >/etc/hosts
ip link set lo up 2>/dev/null

# The NIC (vmfork.network): the same address in every instance, from the command line
# (vmfork.net=ADDR/PREFIX,GATEWAY), so that a restored fork needs no change here.
for arg in $(cat /proc/cmdline); do
	case "$arg" in
	vmfork.net=?*)
		net=${arg#vmfork.net=}
		ip addr add "${net%,*}" dev eth0 && ip link set eth0 up &&
			ip route add default via "${net#*,}" || echo "vmfork: cannot configure eth0 ($net)"
		;;
	esac
done

echo "vmfork: guest ready"
