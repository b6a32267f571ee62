//! The traffic log as pcapng, for tshark and Wireshark: one interface per VM (named after it),
//! nanosecond timestamps (the arrival at the gateway), and each packet's comment giving its
//! epoch and sequence number (`epoch 12 seq 345`).

use std::borrow::Cow;
use std::io::Write;
use std::time::Duration;

use pcap_file::DataLink;
use pcap_file::pcapng::PcapNgWriter;
use pcap_file::pcapng::blocks::enhanced_packet::{EnhancedPacketBlock, EnhancedPacketOption};
use pcap_file::pcapng::blocks::interface_description::{
    InterfaceDescriptionBlock, InterfaceDescriptionOption,
};

use crate::record::{LogRecord, MAX_FRAME};

#[derive(Debug, thiserror::Error)]
#[error("pcapng: {0}")]
pub struct PcapError(String);

impl From<pcap_file::PcapError> for PcapError {
    fn from(e: pcap_file::PcapError) -> Self {
        PcapError(e.to_string())
    }
}

/// Writes frames as pcapng: `interface` for each VM first, then `packet` for each frame.
pub struct PcapNg<W: Write> {
    writer: PcapNgWriter<W>,
    interfaces: u32,
    packets: u64,
}

impl<W: Write> std::fmt::Debug for PcapNg<W> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PcapNg")
            .field("interfaces", &self.interfaces)
            .field("packets", &self.packets)
            .finish()
    }
}

impl<W: Write> PcapNg<W> {
    pub fn new(out: W) -> Result<Self, PcapError> {
        Ok(PcapNg {
            writer: PcapNgWriter::new(out)?,
            interfaces: 0,
            packets: 0,
        })
    }

    /// Declares an Ethernet interface named `name`; returns its id for [`PcapNg::packet`].
    pub fn interface(&mut self, name: &str) -> Result<u32, PcapError> {
        let mut block = InterfaceDescriptionBlock::new(DataLink::ETHERNET, MAX_FRAME as u32);
        block.options = vec![
            InterfaceDescriptionOption::IfName(Cow::Owned(name.to_owned())),
            // Nanoseconds, as the log keeps them.
            InterfaceDescriptionOption::IfTsResol(9),
        ];
        self.writer.write_pcapng_block(block)?;
        self.interfaces += 1;
        Ok(self.interfaces - 1)
    }

    /// Writes one logged frame on interface `interface`, its epoch and number in the comment.
    pub fn packet(&mut self, interface: u32, record: &LogRecord) -> Result<(), PcapError> {
        let block = EnhancedPacketBlock {
            interface_id: interface,
            timestamp: Duration::from_nanos(record.unix_ns),
            original_len: record.frame.len() as u32,
            data: Cow::Borrowed(&record.frame),
            options: vec![EnhancedPacketOption::Comment(Cow::Owned(format!(
                "epoch {} seq {}",
                record.epoch, record.seq
            )))],
        };
        self.writer.write_pcapng_block(block)?;
        self.packets += 1;
        Ok(())
    }

    pub fn packets(&self) -> u64 {
        self.packets
    }

    /// The writer, flushed.
    pub fn finish(self) -> Result<W, PcapError> {
        let mut out = self.writer.into_inner();
        out.flush().map_err(|e| PcapError(e.to_string()))?;
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use pcap_file::pcapng::{Block, PcapNgReader};

    #[test]
    fn frames_read_back_with_their_time_and_comment() {
        let mut pcap = PcapNg::new(Vec::new()).expect("writer");
        let vm = pcap.interface("web/vm-0").expect("interface");
        let record = LogRecord {
            seq: 42,
            epoch: 7,
            unix_ns: 1_700_000_000_123_456_789,
            frame: vec![0xab; 60],
        };
        pcap.packet(vm, &record).expect("packet");
        let bytes = pcap.finish().expect("finished");
        let mut reader = PcapNgReader::new(&bytes[..]).expect("reads");
        let mut packets = 0;
        while let Some(block) = reader.next_block() {
            if let Block::EnhancedPacket(p) = block.expect("a block") {
                packets += 1;
                assert_eq!(p.data.as_ref(), &record.frame[..]);
                assert_eq!(p.timestamp, Duration::from_nanos(record.unix_ns));
                assert!(p.options.iter().any(|o| matches!(
                    o,
                    EnhancedPacketOption::Comment(c) if c == "epoch 7 seq 42"
                )));
            }
        }
        assert_eq!(packets, 1);
    }
}
