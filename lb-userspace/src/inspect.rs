//! Decoding the datapath's maps for people: what `lbctl` prints (being written).
